"""Finetuning engines: ``finetune.base`` parsed once, and a third engine that is one class plus one registry
line, run through the real ``finetune`` flow (Prefect, MLflow on SQLite, the one finetune task)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from groundup.config import FinetuneConfig, InstructDataConfig
from groundup.errors import SettingsError
from groundup.instruct import engines
from groundup.instruct.engines import FinetuneOutcome, parse_base
from groundup.train.state import EvalPoint


def test_finetune_base_is_parsed_into_one_of_four_kinds(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert [parse_base(text).kind for text in ("gpt2-355M", "124M", "gpt2-small", "pretrained")] == [
        "gpt2", "gpt2", "gpt2", "pretrained",
    ]  # fmt: skip
    assert parse_base("gpt2-355M").size == "355M"
    assert parse_base("microsoft/phi-2").kind == "hub"
    assert parse_base(str(tmp_path / "org" / "model")).kind == "directory"
    assert FinetuneConfig(base="gpt2-774M").base_model.from_stage == "fetch_gpt2_weights"


def test_an_engine_refuses_a_base_of_a_kind_it_cannot_finetune():
    with pytest.raises(SettingsError, match="'pretrained' is 'pretrained', which engine 'litgpt' cannot finetune"):
        engines.checked_engine(FinetuneConfig(engine="litgpt", base="pretrained"))
    with pytest.raises(ValueError, match="unknown finetuning engine 'nope'; available: groundup, litgpt"):
        FinetuneConfig(engine="nope")


class ToyEngine:
    """A third engine: its "model" answers every instruction with the most common training answer."""

    name = "toy"
    stage = "finetune_toy"
    accepts = ("directory",)

    def check(self, config: FinetuneConfig) -> None:
        if config.max_steps == 0:
            raise SettingsError("finetune.max_steps=0: the toy engine learns in one step")

    def prepare_base(self, base, output_root: Path, *, hf_token=None, on_line=None) -> Path:
        return Path(base.value)

    def train(self, job, callbacks):
        entries = json.loads(job.train_path.read_text(encoding="utf-8"))
        split = max(1, int(len(entries) * job.val_fraction))
        fit, val = entries[split:], entries[:split]
        answer, count = Counter(e["output"] for e in fit).most_common(1)[0]
        model_dir = job.out_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "answer.json").write_text(json.dumps({"base": str(job.base_dir), "answer": answer}))
        val_file = job.out_dir / "val.json"
        val_file.write_text(json.dumps(val), encoding="utf-8")
        accuracy = sum(e["output"] == answer for e in val) / len(val)
        callbacks.on_eval(EvalPoint(step=1, epoch=1.0, tokens_seen=0, train_loss=1 - count / len(fit), val_loss=1 - accuracy, lr=0.0))
        return FinetuneOutcome(
            model_dir=model_dir, out_dir=job.out_dir, val_file=val_file, n_train=len(fit), n_val=len(val),
            final_metrics={"val_accuracy": accuracy}, summary=f"Answers {answer!r} to everything.",
        )  # fmt: skip


@pytest.mark.slow
def test_a_third_engine_is_one_registry_line(prefect_harness, mlflow_tracking, tmp_path, monkeypatch):
    from groundup import tracking
    from groundup.flows.finetune import finetune

    monkeypatch.setitem(engines.ENGINES, "toy", f"{__name__}:ToyEngine")  # the one line

    base = tmp_path / "toy-base"
    base.mkdir()
    (base / "weights.txt").write_text("nothing to learn from", encoding="utf-8")
    data = tmp_path / "instructions.json"
    outputs = ["yes"] * 14 + ["no"] * 6
    data.write_text(json.dumps([{"instruction": f"Question {i}?", "input": "", "output": o} for i, o in enumerate(outputs)]))

    result = finetune(
        config=FinetuneConfig(engine="toy", base=str(base)),
        data=InstructDataConfig(source=str(data), val_fraction=0.2),
        output_dir=str(mlflow_tracking),
    )
    tuned = result.finetune
    assert (tuned.engine, tuned.model_ref, tuned.n_train + tuned.n_val) == ("toy", "finetuned-toy-base/1", 17)
    registered = tracking.model_directory(tuned.model_ref, tmp_path / "download")
    assert json.loads((registered / "answer.json").read_text())["answer"] == "yes"

    run = tracking.client().get_run(tuned.run_id)
    assert run.data.tags["groundup.stage"] == "finetune_toy"
    assert run.data.metrics["final_val_accuracy"] == tuned.metrics["val_accuracy"]
    assert [m.step for m in tracking.client().get_metric_history(tuned.run_id, "val_loss")] == [1]
    assert tracking.lineage(tuned.model_ref)["parent"]["model"] == f"dir:{base.resolve()}"
