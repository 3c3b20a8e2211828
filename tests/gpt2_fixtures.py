"""Tiny random GPT-2 checkpoints in the real formats, and publishing them the way OpenAI and the hub do.

- :func:`tiny_gpt2`: a ``transformers`` ``GPT2LMHeadModel`` (real vocabulary 50257, a few small layers) with
  every parameter perturbed, so a mix-up of any two tensors changes the logits; :func:`random_gpt2` the same
  at a groundup preset's shape (the benches' "124M", "355M", ...);
- :func:`save_hf`: its ``config.json`` + ``model.safetensors`` as ``save_pretrained`` writes them, or
  (``hub_layout=True``) as the files on the hub are (no ``transformer.`` prefix, causal-mask buffers);
- :func:`save_openai`: the same weights as OpenAI's TensorFlow checkpoint (same variable names and shapes as
  the published files, ``hparams.json``, ``checkpoint``, the BPE files); imports TensorFlow (~15 s);
- :func:`publish_openai` / :func:`publish_hf`: put a checkpoint on a ``tests.httpserver.FileServer`` under
  OpenAI's URL layout / the hub's ``/{repo}/resolve/{revision}/{file}`` with the hub's headers.

Other stages' tests can use these for a GPT-2 base without the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# transformers imports TensorFlow (~15 s) just to see whether it is there, unless told not to.
os.environ.setdefault("USE_TF", "0")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64}
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
OPENAI_CONV1D = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


def tiny_gpt2(seed: int = 0, **config):
    """A random GPT-2 (eval mode) with the real vocabulary; ``config`` overrides :data:`TINY`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **{**TINY, **config}))
    with torch.no_grad():
        # Fresh LayerNorms are exactly 1/0 and biases 0: perturb them so each tensor's mapping matters.
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def random_gpt2(size: str, seed: int = 0):
    """:func:`tiny_gpt2` shaped as a groundup preset or GPT-2 size (``config_from_preset``), 1024 positions."""
    from groundup.model.gpt import config_from_preset

    cfg = config_from_preset(size)
    return tiny_gpt2(seed=seed, n_layer=cfg.n_layers, n_embd=cfg.emb_dim, n_head=cfg.n_heads, n_positions=1024)


def save_hf(model, directory: str | Path, hub_layout: bool = False) -> Path:
    """``config.json`` + ``model.safetensors``; ``hub_layout`` writes names as the files on the hub have them."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if hub_layout:
        cfg = model.config
        state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.transformer.state_dict().items()}
        mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions)).view(1, 1, cfg.n_positions, cfg.n_positions)
        for i in range(cfg.n_layer):
            state[f"h.{i}.attn.bias"] = mask.clone()
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def openai_variables(model) -> dict[str, object]:
    """The model's weights as numpy arrays under OpenAI's TensorFlow variable names and shapes."""
    variables = {}
    for name, tensor in model.transformer.state_dict().items():
        *path, leaf = name.split(".")
        if path[0] == "h":
            path = [f"h{path[1]}", *path[2:]]
        owner = "/".join(path)
        kind = {"weight": "g" if "ln_" in owner else "w", "bias": "b"}[leaf]
        array = tensor.detach().numpy().copy()
        if owner in ("wte", "wpe"):
            variables[f"model/{owner}"] = array
            continue
        if owner.endswith(OPENAI_CONV1D) and kind == "w":
            array = array[None]  # OpenAI's Conv1D weights are [1, in, out]
        variables[f"model/{owner}/{kind}"] = array
    return variables


def save_openai(model, directory: str | Path, vocab_dir: str | Path) -> Path:
    """OpenAI's seven files for ``model``, written with TensorFlow's own v1 Saver like the originals."""
    import tensorflow as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    variables = openai_variables(model)
    with tf.Graph().as_default():
        # Zero-initialised variables filled through load(): the arrays stay out of the graph (and .meta).
        tf_vars = {
            name: tf.compat.v1.get_variable(
                name, shape=array.shape, dtype=tf.float32, initializer=tf.compat.v1.zeros_initializer()
            )
            for name, array in variables.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=tf_vars)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for name, array in variables.items():
                tf_vars[name].load(array, session)
            saver.save(session, str(directory / "model.ckpt"))
    # TF writes absolute paths here; OpenAI's file names the checkpoint relative to its directory.
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    cfg = model.config
    hparams = {"n_vocab": cfg.vocab_size, "n_ctx": cfg.n_positions, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
               "n_layer": cfg.n_layer}
    (directory / "hparams.json").write_text(json.dumps(hparams, indent=2))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(Path(vocab_dir) / name, directory / name)
    return directory


def publish_openai(server, checkpoint: str | Path, size: str = "124M", prefix: str = "models") -> str:
    """Serve a checkpoint directory at ``<url>/<prefix>/<size>/<file>``; returns the base URL to configure."""
    shutil.copytree(checkpoint, Path(server.root) / prefix / size, dirs_exist_ok=True)
    return f"{server.url}/{prefix}"


def publish_hf(server, checkpoint: str | Path, repo_id: str, revision: str = "main", commit: str = HUB_COMMIT) -> str:
    """Serve ``config.json`` and ``model.safetensors`` like the hub; returns the endpoint URL to configure.

    The hub answers HEAD/GET of ``/{repo}/resolve/{revision}/{file}`` with the commit it resolved
    (``X-Repo-Commit``) and, for LFS files, their sha256 and size (``X-Linked-Etag``, ``X-Linked-Size``).
    """
    target = Path(server.root) / repo_id / "resolve" / revision
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        data = (Path(checkpoint) / name).read_bytes()
        (target / name).write_bytes(data)
        headers = {"X-Repo-Commit": commit}
        if name.endswith(".safetensors"):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        server.headers[f"{repo_id}/resolve/{revision}/{name}"] = headers
    return server.url


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """transformers' own greedy decoding (no end-of-text stop, so it matches the workshop's loop)."""
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )


def assert_reproduces(reference, checkpoint: str | Path) -> None:
    """Same logits as transformers within 1e-4, identical greedy tokens (with and without the KV cache)."""
    from groundup.model.generate import generate
    from groundup.model.io import load_checkpoint

    ours = load_checkpoint(checkpoint)
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(reference, ids), atol=1e-4, rtol=0)
    prompt = ids[:1, :5]
    expected = hf_greedy(reference, prompt, 12)
    assert torch.equal(generate(ours, prompt, 12), expected)
    assert torch.equal(generate(ours, prompt, 12, use_cache=False), expected)
