"""GPT-2 weights into our ``GPTModel``: one explicit name mapping, in the style of nanoGPT's ``from_pretrained``.

OpenAI's TensorFlow checkpoint and the Hugging Face safetensors hold the same tensors under different
names. Each reader (``openai_tf``, ``huggingface``) hands over :class:`SourceWeights` in one canonical
naming, Hugging Face's without the ``transformer.`` prefix (``h.0.attn.c_attn.weight``), with GPT-2's
Conv1D weights laid out ``[in, out]``. This module checks those tensors against the configuration and maps
them onto our names: Conv1D weights are transposed into ``nn.Linear``'s ``[out, in]``, the fused
``c_attn`` is split into ``W_query`` / ``W_key`` / ``W_value``, and the output head is tied to the token
embedding, as GPT-2 was trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from groundup.model.gpt import GPT2_SIZES, PRESETS, GPTConfig, GPTModel
from groundup.weights.source import SourceWeights, WeightsError

GPT2_VOCAB_SIZE = 50257
GPT2_CONTEXT = 1024


def gpt2_config(*, vocab_size: int, context_length: int, emb_dim: int, n_heads: int, n_layers: int) -> GPTConfig:
    """Our config for a GPT-2-shaped checkpoint: biases on q/k/v, a tied head, no dropout (inference)."""
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=0.0,
        qkv_bias=True,
        tie_weights=True,
    )


def check_size(size: str) -> str:
    if size not in GPT2_SIZES:
        raise WeightsError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
    return size


def size_of(cfg: GPTConfig) -> str | None:
    """Which of OpenAI's four GPT-2 sizes ``cfg`` is (``"124M"`` …), or None for another shape."""
    if (cfg.vocab_size, cfg.context_length) != (GPT2_VOCAB_SIZE, GPT2_CONTEXT):
        return None
    for size, preset in GPT2_SIZES.items():
        if all(getattr(cfg, key) == value for key, value in PRESETS[preset].items()):
            return size
    return None


def model_name(cfg: GPTConfig) -> str:
    """The registry name of a converted checkpoint: ``gpt2-124m`` … or ``gpt2-custom`` for other shapes."""
    size = size_of(cfg)
    return f"gpt2-{size.lower()}" if size else "gpt2-custom"


def parameter_count(cfg: GPTConfig) -> int:
    """Parameters of the model ``cfg`` describes (the tied head counted once), without allocating them."""
    with torch.device("meta"):
        return GPTModel(cfg).num_parameters()


def source_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 checkpoint with this config holds, by canonical name, with its shape."""
    d, hidden = cfg.emb_dim, 4 * cfg.emb_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (cfg.vocab_size, d),
        "wpe.weight": (cfg.context_length, d),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,),
            h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d),
            h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d),
            h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,),
            h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, hidden),
            h + "mlp.c_fc.bias": (hidden,),
            h + "mlp.c_proj.weight": (hidden, d),
            h + "mlp.c_proj.bias": (d,),
        })
    return shapes


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    cfg: GPTConfig,
    origin: str,
    source_names: Mapping[str, str] | None = None,
) -> None:
    """Every tensor GPT-2 needs present with its shape, nothing else; all problems in one message.

    Readers call this with the shapes from the file's index before reading gigabytes of weights.
    """
    expected = source_shapes(cfg)
    named = source_names or {}

    def label(name: str) -> str:
        own = named.get(name, name)
        return name if own == name else f"{own} ({name})"

    problems = [f"missing tensor {label(name)}" for name in expected if name not in shapes]
    problems += [
        f"tensor {label(name)} has shape {tuple(shape)}, but the checkpoint's config "
        f"(vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, emb_dim={cfg.emb_dim}) "
        f"needs {expected[name]}"
        for name, shape in shapes.items()
        if name in expected and tuple(shape) != expected[name]
    ]
    problems += [f"unexpected tensor {label(name)}" for name in shapes if name not in expected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise WeightsError(f"{origin}: does not fit a GPT-2 of its own config: {shown}")


def _block(t: dict[str, torch.Tensor], h: str) -> dict[str, torch.Tensor]:
    """One transformer block: our names (relative to ``trf_blocks.{i}.``) from the source's (under ``h``)."""
    # Conv1D keeps weights as [in, out]; nn.Linear as [out, in]. The fused c_attn output is q | k | v.
    q_w, k_w, v_w = t[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
    # Cloned: views into one storage would make safetensors refuse to save them as separate tensors.
    q_b, k_b, v_b = (bias.clone() for bias in t[h + "attn.c_attn.bias"].chunk(3, dim=0))
    return {
        "norm1.weight": t[h + "ln_1.weight"],
        "norm1.bias": t[h + "ln_1.bias"],
        "att.W_query.weight": q_w,
        "att.W_key.weight": k_w,
        "att.W_value.weight": v_w,
        "att.W_query.bias": q_b,
        "att.W_key.bias": k_b,
        "att.W_value.bias": v_b,
        "att.out_proj.weight": t[h + "attn.c_proj.weight"].t(),
        "att.out_proj.bias": t[h + "attn.c_proj.bias"],
        "norm2.weight": t[h + "ln_2.weight"],
        "norm2.bias": t[h + "ln_2.bias"],
        "ff.layers.0.weight": t[h + "mlp.c_fc.weight"].t(),
        "ff.layers.0.bias": t[h + "mlp.c_fc.bias"],
        "ff.layers.2.weight": t[h + "mlp.c_proj.weight"].t(),
        "ff.layers.2.bias": t[h + "mlp.c_proj.bias"],
    }


def to_groundup_state(source: SourceWeights) -> dict[str, torch.Tensor]:
    """Our state dict (float32, contiguous) from checked source tensors."""
    shapes = {name: tuple(tensor.shape) for name, tensor in source.tensors.items()}
    check_shapes(shapes, source.config, source.origin, source.source_names)
    t = source.tensors
    state = {
        "tok_emb.weight": t["wte.weight"],
        "pos_emb.weight": t["wpe.weight"],
        "final_norm.weight": t["ln_f.weight"],
        "final_norm.bias": t["ln_f.bias"],
    }
    for i in range(source.config.n_layers):
        state.update({f"trf_blocks.{i}.{name}": tensor for name, tensor in _block(t, f"h.{i}.").items()})
    return {name: tensor.to(torch.float32).contiguous() for name, tensor in state.items()}


def build_model(source: SourceWeights) -> GPTModel:
    """A ``GPTModel`` holding the source's weights (eval mode, CPU).

    The model is built on the meta device and the converted tensors are assigned to it, so no random
    initialisation runs and no third copy of the weights is allocated (1558M is 6 GB in float32).
    """
    state = to_groundup_state(source)
    with torch.device("meta"):
        model = GPTModel(source.config)
    state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.out_head.weight = model.tok_emb.weight  # assign=True made two Parameters: share one again
    return model.eval()

