"""Builders the evaluation tests share: a tiny groundup GPT checkpoint, a LoRA adapter on it, and a local
lm-eval multiple-choice task (the format of ``mmlu_philosophy``, data in a local JSON Lines file)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MC_TASK = "philosophy_local"
MC_CHOICES = ["A", "B", "C", "D"]
MC_QUESTIONS = [
    ("Who wrote the Republic?", ["Plato", "Kant", "Hume", "Locke"], 0),
    ("Which is a virtue in Aristotle's ethics?", ["greed", "courage", "envy", "sloth"], 1),
    ("Who said 'I think, therefore I am'?", ["Hobbes", "Mill", "Descartes", "Marx"], 2),
    ("Utilitarianism judges acts by their?", ["motives", "duties", "origins", "consequences"], 3),
    ("Socrates was a teacher of?", ["Plato", "Newton", "Darwin", "Euclid"], 0),
    ("Which branch studies knowledge?", ["ethics", "epistemology", "aesthetics", "logic"], 1),
]


def save_tiny_gpt(directory: Path, context_length: int = 128, seed: int = 0) -> Path:
    """A random ``gpt-tiny`` checkpoint (GPT-2 vocabulary) in our format."""
    from groundup.model.gpt import GPTModel, config_from_preset
    from groundup.model.io import save_checkpoint

    torch.manual_seed(seed)
    return save_checkpoint(GPTModel(config_from_preset("gpt-tiny", context_length=context_length)), directory)


def save_tiny_adapter(base: Path, directory: Path, seed: int = 1) -> Path:
    """A LoRA adapter on ``base`` with non-zero B matrices, so the adapted model differs from the base."""
    from groundup.config import LoRAConfig
    from groundup.model.io import load_checkpoint
    from groundup.model.lora import apply_lora, base_reference, lora_layers, save_adapter

    lora = LoRAConfig(r=4, alpha=8)
    model = apply_lora(load_checkpoint(base), lora)
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return save_adapter(model, directory, lora, base_reference(base))


def mc_doc_to_text(question: str, choices: list[str]) -> str:
    return (
        f"{question}\n"
        + "\n".join(f"{letter}. {c}" for letter, c in zip(MC_CHOICES, choices, strict=True))
        + "\nAnswer:"
    )


def write_mc_task(directory: Path) -> Path:
    """``directory`` with ``philosophy_local.yaml`` and its data; pass it as ``MCEvalConfig.include_path``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "philosophy.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_QUESTIONS)
    )
    (directory / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. '
        '{{choices[3]}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return directory
