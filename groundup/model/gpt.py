"""A GPT-2-architecture language model, coded from scratch.

One readable file in the spirit of nanoGPT's model.py. The names follow the workshop (``tok_emb``,
``trf_blocks``, ``W_query`` …) so a learner can put the notebook and this file side by side; the
differences are the fast paths a reader can still follow:

- attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
  device has them) instead of an explicit mask and softmax;
- LayerNorm and GELU(tanh) are PyTorch's native modules (the same maths as the workshop's hand-written
  ones, with eps 1e-5);
- the output head can share the token embedding (GPT-2 does; ``tie_weights``);
- an optional KV cache makes generation linear instead of quadratic in the output length. Each token's
  keys and values go to the cache slot of its position, per row: prompts of different lengths share one
  right-padded batch, and a one-token step always has the same shapes, so it can be compiled;
- a prompt pass can ask for one token's logits per row (``logits_at``), all that generation needs from it:
  the output head is the model's largest product;
- ``decoding_layout`` stores the weight matrices the way one-token steps read fastest on AVX2-only CPUs
  (see there);
- ``FewRowsLinear`` multiplies 4-15 rows by a large matrix through oneDNN outside training, where MKL
  reads the weights once or more per row pair (batched decoding, prompt lookup's checking passes; see
  there).

q, k and v stay separate linear layers, so LoRA can target each and the GPT-2 loader splits OpenAI's
fused ``c_attn`` explicitly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = False
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


# The four OpenAI GPT-2 sizes (context 1024, vocab 50257) and two small ones for CPU work and tests.
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
    "gpt-mini": dict(emb_dim=256, n_layers=4, n_heads=4, context_length=256),
    "gpt-tiny": dict(emb_dim=64, n_layers=2, n_heads=2, context_length=64),
}
GPT2_SIZES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def config_from_preset(preset: str, **overrides) -> GPTConfig:
    """``gpt2-small`` … ``gpt2-xl`` (also by size, ``124M``), ``gpt-mini``, ``gpt-tiny`` plus overrides."""
    name = GPT2_SIZES.get(preset, preset)
    if name not in PRESETS:
        choices = ", ".join([*PRESETS, *GPT2_SIZES])
        raise ValueError(f"unknown model preset {preset!r}; choose one of: {choices}")
    return GPTConfig.from_dict({**PRESETS[name], **overrides})


class KVCache:
    """Keys and values of every layer, one preallocated slot per position (``max_length`` of them).

    A token's key and value are written to the slot of its position in its row, and a token attends to
    the slots up to its own position. A row's slots past its last token (padding, or nothing yet) are
    therefore never read until a later token of that row has overwritten them.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_length: int, device, dtype) -> None:
        # Heads before slots: each layer's keys and values are already what attention reads, contiguous.
        # A tensor per layer, not one with a layer dimension: a compiled step (torch.compile) then writes a
        # token into its layer's tensor in place, where a write into a view of one big tensor makes it copy
        # the whole cache back every step (measured: a compiled step 1.3-1.6x slower than eager, not faster).
        shape = (batch_size, cfg.n_heads, max_length, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)
        self.slots = torch.arange(max_length, device=device)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def attention_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, tokens, max_length)``: True where a token may attend (slots up to its position)."""
        return (self.slots <= positions.unsqueeze(-1)).unsqueeze(1)

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``(batch, tokens, heads, head_dim)`` keys/values at ``(batch, tokens)`` positions; returns
        every slot of the layer as ``(batch, heads, max_length, head_dim)``."""
        # Indices around a slice put their dimensions first: [rows, :, positions] addresses
        # (batch, tokens, heads, head_dim), the shape of k and v.
        self.keys[layer][self.rows, :, positions] = k
        self.values[layer][self.rows, :, positions] = v
        return self.keys[layer], self.values[layer]


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = cfg.drop_rate  # on the attention weights; the block drops the output (drop_shortcut)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without a cache, causal attention over ``x``; with one, ``x``'s keys and values are stored at
        ``positions`` and ``mask`` (``cache.attention_mask(positions)``) says which slots each token sees."""
        b, t, d = x.shape

        def heads(proj: nn.Module) -> torch.Tensor:  # (b, t, d) -> (b, t, heads, head_dim)
            return proj(x).view(b, t, self.n_heads, self.head_dim)

        q, k, v = heads(self.W_query), heads(self.W_key), heads(self.W_value)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out_proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, positions, mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    def forward(
        self,
        in_idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(batch, tokens)`` ids -> ``(batch, tokens, vocab)`` logits.

        ``positions`` (``(batch, tokens)``, default ``0 … tokens-1`` in every row) place the tokens; with a
        ``cache`` they are also the slots their keys and values go to (see :class:`KVCache`), so a prompt
        is fed at ``0 … n-1`` and each later token at the next position of its row.

        ``logits_at`` (``(batch,)`` token indices) returns only those tokens' logits, ``(batch, 1, vocab)``:
        a prompt pass needs just the next token's, and the output head is the model's largest product.
        """
        b, t = in_idx.shape
        if positions is None:
            if t > self.cfg.context_length:
                raise ValueError(
                    f"sequence of {t} tokens exceeds the context length {self.cfg.context_length}"
                )
            positions = torch.arange(t, device=in_idx.device).expand(b, t)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        mask = cache.attention_mask(positions) if cache is not None else None
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache, layer, positions, mask)
        if logits_at is not None:
            x = x.gather(1, logits_at.view(b, 1, 1).expand(b, 1, x.shape[-1]))
        return self.out_head(self.final_norm(x))

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        ref = self.pos_emb.weight
        return KVCache(self.cfg, batch_size, max_length or self.cfg.context_length, ref.device, ref.dtype)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Counts shared tensors once, so a tied head is not counted twice."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def init_weights(model: GPTModel, seed: int | None = None) -> GPTModel:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
    if seed is not None:
        torch.manual_seed(seed)
    std = 0.02
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * model.cfg.n_layers) if name.endswith(("out_proj", "layers.2")) else 1
            nn.init.normal_(module.weight, 0.0, std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
    return model


def decoding_layout(model: GPTModel) -> GPTModel:
    """Store every weight matrix with at least as many outputs as inputs (query, key, value, the attention's
    output projection, the feed-forward's first layer, the output head and the embedding it may share)
    input-major, as GPT-2's own ``Conv1D`` does; the feed-forward's second layer stays output-major.

    A one-token step multiplies a single vector by each matrix, which reads the whole matrix from memory;
    on a CPU with AVX2 (MKL) that is fastest along the matrix's longer side: 1.5-1.7x for the output head
    and the feed-forward's first layer (``bench.peers``' ``layout_products``); with AVX-512 1.04-1.16x,
    which whole decoding runs did not show. Values, shapes and the state dict stay the same (a saved
    checkpoint is the same file); only the strides change. It costs one copy of those matrices and does
    not speed up training's matrix products, so the inference loader calls it where it pays
    (:func:`groundup.model.loading.layout_pays`), not training.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features >= module.in_features:
            if module.weight.is_contiguous():  # still output-major, as loaded (a tied head: only once)
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


class FewRowsLinear(nn.Linear):
    """``nn.Linear`` that sends a CPU product of 4-15 rows to oneDNN when no gradient is being recorded.

    Batched decoding (8 prompts: 8 rows a step) and prompt lookup's checking passes (2-11 rows) multiply a
    few rows by every weight matrix. For 4-15 rows MKL, which ``F.linear`` uses on a CPU, takes longer
    the more rows it gets, as if it read the weights again for every row or two: the output head took
    24 ms for 4 rows, 40 ms for 8, 69 ms for 13, then 25 ms for 16 (one thread, AVX-512), where oneDNN's
    product took 18-23 ms for all of them. For 1-3 rows MKL is the faster, from 16 on the two are alike:
    those stay with ``F.linear``, and so does anything autograd must see (the oneDNN op has no backward)
    or ``torch.compile`` traces (inductor lowers the op only for weights frozen into the graph). The
    values agree up to float rounding (~2e-6); parameters and state dict are ``nn.Linear``'s.

    Only matrices of ``MIN_WEIGHT`` elements or more (8 MB of fp32) are worth it: a oneDNN call costs
    0.02-0.04 ms more than MKL's, more than MKL loses on a smaller one (gpt2-small's 768 x 768 layers at
    two threads); gpt2-small's feed-forward layers (768 x 3072) and output head gain at one and two.
    """

    ROWS = range(4, 16)
    MIN_WEIGHT = 2**21

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not torch.compiler.is_compiling()  # first: a traced batch size may be symbolic
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.is_contiguous()  # not laid out by decoding_layout
            and x.numel() // x.shape[-1] in self.ROWS
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


def few_rows_through_onednn(model: nn.Module, min_weight: int = FewRowsLinear.MIN_WEIGHT) -> nn.Module:
    """Make every plain ``nn.Linear`` of ``model`` with at least ``min_weight`` weights a
    :class:`FewRowsLinear`, in place: the same parameters (a tied head stays tied), another ``forward``.
    The inference loader calls it where it was measured to pay (:func:`groundup.model.loading.onednn_pays`);
    training has no use for it."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.numel() >= min_weight:
            module.__class__ = FewRowsLinear
    return model
