"""LoRA from scratch on our GPT: equivalence at init and after merging, frozen base, adapters on disk."""

from __future__ import annotations

import json

import pytest
import torch

from groundup.config import LoRAConfig
from groundup.model.gpt import GPTModel, config_from_preset, init_weights
from groundup.model.io import CheckpointError, load_checkpoint, save_checkpoint
from groundup.model.loading import load_model
from groundup.model.lora import (
    LoRALinear,
    apply_lora,
    base_reference,
    export_merged,
    load_adapted_model,
    lora_layers,
    lora_state_dict,
    lora_targets,
    merge_lora,
    save_adapter,
)

EVERY_LAYER = LoRAConfig(
    r=4, alpha=8, dropout=0.1, query=True, key=True, value=True, projection=True, mlp=True, head=True
)


def tiny_model(tie_weights: bool = False, seed: int = 0) -> GPTModel:
    cfg = config_from_preset("gpt-tiny", vocab_size=97, context_length=16, tie_weights=tie_weights)
    return init_weights(GPTModel(cfg), seed=seed).eval()


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


def randomize_lora(model: GPTModel) -> None:
    """Stand-in for training: give every B a non-zero value so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def test_targets_follow_the_settings():
    model = tiny_model()
    assert lora_targets(model, LoRAConfig()) == [
        "trf_blocks.0.att.W_query",
        "trf_blocks.0.att.W_value",
        "trf_blocks.1.att.W_query",
        "trf_blocks.1.att.W_value",
    ]
    names = lora_targets(model, EVERY_LAYER)
    assert len(names) == 2 * 6 + 1 and names[-1] == "out_head" and "trf_blocks.1.ff.layers.2" in names
    with pytest.raises(ValueError, match="select no layer"):
        apply_lora(model, LoRAConfig(query=False, value=False))


def test_lora_linear_initialisation():
    layer = LoRALinear(torch.nn.Linear(32, 48), r=4, alpha=8)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (48, 4)
    assert torch.count_nonzero(layer.lora_B) == 0
    # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), not all zero.
    bound = 1 / 32**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert layer.scaling == 2.0


@pytest.mark.parametrize("tie_weights", [False, True])
def test_outputs_equal_the_base_model_right_after_wrapping(tie_weights):
    model, x = tiny_model(tie_weights), tokens()
    with torch.no_grad():
        expected = model(x)
        apply_lora(model, EVERY_LAYER).eval()
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("tie_weights", [False, True])
def test_only_lora_parameters_train(tie_weights):
    model = apply_lora(tiny_model(tie_weights), EVERY_LAYER).train()
    lora_params = {id(p) for p in lora_state_dict(model).values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == lora_params
    assert model.num_parameters(trainable_only=True) == sum(
        p.numel() for p in lora_state_dict(model).values()
    )

    x = tokens()
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    for name, param in model.named_parameters():
        if id(param) in lora_params:
            assert param.grad is not None, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    # B starts at zero, so A's first gradient is zero and B's is not: the update starts through B.
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lora_layers(model).values())


@pytest.mark.parametrize("tie_weights", [False, True])
def test_merged_model_equals_the_adapted_one(tie_weights):
    model, x = apply_lora(tiny_model(tie_weights), EVERY_LAYER).eval(), tokens()
    randomize_lora(model)
    embedding_before = model.tok_emb.weight.detach().clone()
    base_logits = tiny_model(tie_weights)(x)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapter really does something
        merge_lora(model)
        merged = model(x)
    assert not lora_layers(model) and type(model.out_head) is torch.nn.Linear
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    # Merging into a tied head must not change the token embedding.
    assert torch.equal(model.tok_emb.weight, embedding_before)
    assert model.cfg.tie_weights is False


def test_adapter_round_trip(tmp_path):
    base_dir = save_checkpoint(tiny_model(tie_weights=True), tmp_path / "base")
    model = apply_lora(load_checkpoint(base_dir), EVERY_LAYER)
    randomize_lora(model)
    adapter = save_adapter(model, tmp_path / "adapter", EVERY_LAYER, base_reference(base_dir, "gpt2-124m/1"))

    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.json", "adapter.safetensors"]
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["base"]["path"] == str(base_dir.resolve()) and meta["base"]["model_ref"] == "gpt2-124m/1"
    assert meta["lora"]["r"] == 4 and meta["targets"] == list(lora_layers(model))
    # The adapter holds the LoRA tensors only.
    assert (adapter / "adapter.safetensors").stat().st_size < (
        base_dir / "model.safetensors"
    ).stat().st_size / 4

    unmerged = load_adapted_model(adapter, merge=False)
    for key, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(unmerged)[key], tensor), key

    x = tokens()
    with torch.no_grad():
        expected = model.eval()(x)
        # model.io.load_model is the entry point `groundup generate` and the response stage use.
        torch.testing.assert_close(load_model(adapter)(x), expected, atol=1e-5, rtol=1e-5)
        exported = load_checkpoint(export_merged(adapter, tmp_path / "merged"))
        torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=1e-5)


def test_adapter_refuses_other_base_weights(tmp_path):
    base_dir = save_checkpoint(tiny_model(seed=0), tmp_path / "base")
    model = apply_lora(load_checkpoint(base_dir), LoRAConfig())
    adapter = save_adapter(model, tmp_path / "adapter", LoRAConfig(), base_reference(base_dir))

    save_checkpoint(tiny_model(seed=1), base_dir)  # the base changed under the adapter
    with pytest.raises(CheckpointError, match="trained on other weights"):
        load_model(adapter)

    for path in base_dir.iterdir():
        path.unlink()
    base_dir.rmdir()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(adapter)


def test_adapter_that_does_not_fit_its_base(tmp_path):
    base_dir = save_checkpoint(tiny_model(), tmp_path / "base")
    model = apply_lora(load_checkpoint(base_dir), LoRAConfig(r=2))
    adapter = save_adapter(model, tmp_path / "adapter", LoRAConfig(r=2), base_reference(base_dir))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["lora"]["r"] = 3
    (adapter / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lora_A: adapter \(2, 64\) vs model \(3, 64\)"):
        load_model(adapter)
