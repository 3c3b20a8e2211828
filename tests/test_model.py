"""The from-scratch GPT: sizes, masking, the same function as the workshop's plain implementation, checkpoints."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from groundup.model import loading
from groundup.model.generate import generate
from groundup.model.gpt import (
    FewRowsLinear,
    GPTConfig,
    GPTModel,
    config_from_preset,
    decoding_layout,
    few_rows_through_onednn,
    init_weights,
)
from groundup.model.io import CheckpointError, load_checkpoint, save_checkpoint
from groundup.model.loading import load_model
from tests.conftest import ROOT


def reference_module():
    spec = importlib.util.spec_from_file_location("reference_gpt", ROOT / "bench" / "reference_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return init_weights(GPTModel(config_from_preset("gpt-tiny", vocab_size=97, **overrides)))


def test_gpt2_small_parameter_counts_untied_and_tied():
    # Built on the meta device: the counts need shapes only, not 650 MB of memory.
    with torch.device("meta"):
        untied = GPTModel(config_from_preset("gpt2-small"))
        tied = GPTModel(config_from_preset("gpt2-small", tie_weights=True))
    assert untied.num_parameters() == 163_009_536
    assert tied.num_parameters() == 124_412_160
    assert tied.out_head.weight is tied.tok_emb.weight


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-mini"])
def test_parameter_count_follows_the_architecture(preset):
    cfg = config_from_preset(preset)
    d, v = cfg.emb_dim, cfg.vocab_size
    per_block = 4 * d * d + d + 8 * d * d + 5 * d + 4 * d  # q, k, v, out_proj(+bias); MLP; two LayerNorms
    expected = 2 * v * d + cfg.context_length * d + cfg.n_layers * per_block + 2 * d
    with torch.device("meta"):
        assert GPTModel(cfg).num_parameters() == expected


def test_logits_shape_is_batch_tokens_vocab():
    model = tiny()
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)


def test_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_same_function_as_the_plain_workshop_implementation(qkv_bias):
    ref = reference_module()
    model = tiny(qkv_bias=qkv_bias).eval()
    plain = ref.copy_weights(model, ref.ReferenceGPT(model.cfg)).eval()
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx), atol=1e-5, rtol=1e-5)


def test_training_drops_each_residual_branch_once_as_the_workshop_does():
    """Dropout on the embeddings, the attention weights (inside SDPA) and each block's two branches: an
    attention output dropped again inside the attention module would be dropped twice."""
    model = GPTModel(config_from_preset("gpt-tiny", drop_rate=0.1)).train()
    calls = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda module, args, out: calls.append(module))
    model(torch.zeros((1, 4), dtype=torch.long))
    assert len(calls) == 1 + 2 * model.cfg.n_layers
    assert calls[0] is model.drop_emb
    assert all(m is b.drop_shortcut for m, b in zip(calls[1::2], model.trf_blocks, strict=True))


def test_chunked_prefill_with_cache_matches_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 25))
    cache = model.new_cache(2)
    positions = torch.arange(25).expand(2, 25)
    with torch.no_grad():
        full = model(idx)
        parts = [model(idx[:, a:b], cache, positions[:, a:b]) for a, b in ((0, 10), (10, 11), (11, 25))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_logits_at_one_token_per_row_are_that_tokens_logits_and_fill_the_same_cache():
    """A prompt pass asks for each row's newest token only (rows of different lengths, right-padded): the
    same logits as the full output at those tokens, and the cache the next step reads is the same."""
    model = tiny().eval()
    idx = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    newest = torch.tensor([11, 4, 8])
    positions = torch.arange(12).expand(3, 12)
    full_cache, one_cache = model.new_cache(3, 16), model.new_cache(3, 16)
    with torch.no_grad():
        full = model(idx, full_cache, positions)
        one = model(idx, one_cache, positions, logits_at=newest)
        assert one.shape == (3, 1, 97)
        torch.testing.assert_close(one[:, 0], full[torch.arange(3), newest], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx, logits_at=newest), one, atol=1e-5, rtol=1e-5)
        following, after_newest = torch.tensor([[1], [2], [3]]), (newest + 1).unsqueeze(1)
        torch.testing.assert_close(
            model(following, one_cache, after_newest), model(following, full_cache, after_newest)
        )


def test_rows_of_different_lengths_share_a_cache_without_seeing_the_padding():
    model = tiny().eval()
    short, long = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 11))
    padded = torch.cat([torch.cat([short, torch.full((1, 5), 96)], dim=1), long])  # short row right-padded
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        logits = model(padded, cache, torch.arange(11).expand(2, 11))
        # The short row's next token goes to position 6, over its padding's slot.
        step = model(torch.tensor([[5], [7]]), cache, torch.tensor([[6], [11]]))
        alone = model(torch.cat([short, torch.tensor([[5]])], dim=1))
    torch.testing.assert_close(logits[0, :6], alone[0, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone[0, 6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(long)[0], atol=1e-5, rtol=1e-5)


def test_longer_than_context_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: config_from_preset("gpt-huge"), "unknown model preset 'gpt-huge'"),
        (lambda: config_from_preset("gpt-tiny", emb_dim=50, n_heads=3), r"emb_dim \(50\) must be divisible by n_heads \(3\)"),
        (lambda: GPTConfig.from_dict({"emb_dim": 64, "heads": 2}), r"unknown keys \['heads'\]"),
    ],
)
def test_bad_configs_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_checkpoint_round_trip_tied_weights(tmp_path):
    model = tiny(tie_weights=True).eval()
    save_checkpoint(model, tmp_path / "ckpt", metadata={"tokenizer": "gpt2"})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.out_head.weight is loaded.tok_emb.weight
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tokenizer"] == "gpt2"


def test_checkpoint_loads_onto_the_meta_built_model_with_identical_logits(tmp_path):
    model = tiny().eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(p.requires_grad for p in loaded.parameters())  # finetuning starts from a loaded model
    assert loaded.out_head.weight is not loaded.tok_emb.weight
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_decoding_layout_changes_strides_only(tmp_path):
    """Wide matrices become input-major (the tied head with its embedding), the feed-forward's second layer
    stays: the same logits, greedy tokens and checkpoint, and laying out twice changes nothing."""
    model = tiny(tie_weights=True).eval()
    stored = {name: t.clone() for name, t in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(idx)
    tokens = generate(model, idx, 24)

    decoding_layout(model)
    block, d = model.trf_blocks[0], model.cfg.emb_dim
    att = block.att
    for wide in (att.W_query, att.W_key, att.W_value, att.out_proj, block.ff.layers[0]):
        assert wide.weight.stride() == (1, wide.out_features)
    assert block.ff.layers[2].weight.stride() == (4 * d, 1)  # 4d inputs, d outputs: read fastest as stored
    assert model.out_head.weight is model.tok_emb.weight and model.out_head.weight.stride() == (1, 97)
    assert all(torch.equal(t, stored[name]) for name, t in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), logits)
    assert torch.equal(generate(model, idx, 24), tokens)
    pointers = [p.data_ptr() for p in model.parameters()]
    decoding_layout(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers

    save_checkpoint(model, tmp_path / "laid-out")  # saved as stored: the same tensors come back
    reloaded = load_checkpoint(tmp_path / "laid-out")
    assert all(torch.equal(t, stored[name]) for name, t in reloaded.state_dict().items())
    assert reloaded.out_head.weight.is_contiguous()


@pytest.mark.parametrize("capability", ["AVX2", "AVX512", "DEFAULT"])
def test_the_inference_loader_lays_out_where_it_pays_and_training_loads_as_stored(
    tmp_path, monkeypatch, capability
):
    """Laid out on an AVX2 CPU (measured faster there), as stored on AVX-512 (measured no faster) and on
    CPUs nobody measured; whatever the layout and products, the same logits."""
    save_checkpoint(tiny(), tmp_path / "ckpt")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for_decoding = load_model(tmp_path / "ckpt", "cpu")
    as_stored = load_checkpoint(tmp_path / "ckpt")
    assert as_stored.out_head.weight.is_contiguous()
    if capability == "AVX2":
        assert for_decoding.out_head.weight.stride() == (1, 97)
        assert for_decoding.tok_emb.weight.stride() != (1, 97)  # untied: the embedding is read by rows
    else:
        assert all(p.is_contiguous() for p in for_decoding.parameters())
    # A few rows through oneDNN only where that was measured to pay: the AVX-512 CPU, a model whose weights
    # do not fit in a cache (the threshold lowered for a 9 MB one), and its large matrices: here an output
    # head of 33000 x 64 (2.1M weights), not the 64-wide layers.
    torch.manual_seed(0)
    save_checkpoint(GPTModel(config_from_preset("gpt-tiny", vocab_size=33_000)), tmp_path / "wide-head")
    assert type(load_model(tmp_path / "wide-head", "cpu").out_head) is nn.Linear  # 9 MB: cached
    monkeypatch.setattr(loading, "ONEDNN_MIN_MODEL_BYTES", 2**20)
    wide_head = load_model(tmp_path / "wide-head", "cpu")
    onednn = capability == "AVX512" and torch.backends.mkldnn.is_available()
    assert type(wide_head.out_head) is (FewRowsLinear if onednn else nn.Linear)
    assert all(type(m) is nn.Linear for m in wide_head.trf_blocks.modules() if isinstance(m, nn.Linear))
    assert not any(isinstance(m, FewRowsLinear) for m in [*as_stored.modules(), *for_decoding.modules()])
    idx = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(for_decoding(idx), as_stored(idx))


def onednn_products(layer: nn.Module, x: torch.Tensor) -> int:
    """How many times ``layer(x)`` called oneDNN's linear op (what torch's profiler saw)."""
    with profile() as prof:
        layer(x)
    return sum(event.name == "mkldnn::_linear_pointwise" for event in prof.events())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch built with oneDNN")
def test_few_rows_go_through_onednn_outside_training_with_the_same_values(tmp_path):
    """4-15 rows without a gradient go to oneDNN; 1-3 rows, 16 or more, and anything autograd records stay
    with F.linear. The same values and gradients either way; the same parameters, tie and checkpoint."""
    model = tiny(tie_weights=True)
    stored = {name: t.clone() for name, t in model.state_dict().items()}
    few_rows_through_onednn(model, min_weight=0)  # every layer, however small
    assert all(type(m) is FewRowsLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert model.out_head.weight is model.tok_emb.weight
    assert all(torch.equal(t, stored[name]) for name, t in model.state_dict().items())

    layer = model.trf_blocks[0].ff.layers[0]
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for shape in [(1, 64), (3, 64), (4, 64), (8, 1, 64), (3, 5, 64), (16, 64), (2, 20, 64)]:
            x = torch.randn(*shape, generator=generator)
            rows = x.numel() // 64
            assert onednn_products(layer, x) == (1 if 4 <= rows < 16 else 0), shape
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    x = torch.randn(8, 64, generator=generator, requires_grad=True)
    assert onednn_products(layer, x) == 0  # autograd records it: the oneDNN op has no backward
    layer(x).square().sum().backward()
    expected = x.detach().clone().requires_grad_()
    F.linear(expected, layer.weight.detach(), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)

    save_checkpoint(model, tmp_path / "ckpt")
    reloaded = load_checkpoint(tmp_path / "ckpt").state_dict()
    assert all(torch.equal(t, stored[name]) for name, t in reloaded.items())


def test_checkpoint_of_another_config_and_corrupted_file_are_errors(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="differs from the expected one"):
        load_checkpoint(tmp_path / "ckpt", expected=config_from_preset("gpt-mini"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted or unreadable"):
        load_checkpoint(tmp_path / "ckpt")
