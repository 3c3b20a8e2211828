"""Settings for every stage, as pydantic models.

The same models are the parameters of the Prefect flows (the Prefect UI renders them as forms), the
contents of the YAML profiles in ``groundup/profiles/`` and the targets of ``--set key=value`` overrides
on the command line. Unknown keys are rejected everywhere, so a typo is an error instead of a silently
ignored setting.

Over 350 lines on purpose: every stage's settings in one module, so the profiles, the flows' parameter
forms and ``--set`` overrides share one vocabulary that can be read in one place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from groundup.errors import SettingsError
from groundup.instruct.engines import ENGINES, PRETRAINED_BASE, FinetuneBase, parse_base

THE_VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
)
INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
    "instruction-data.json"
)
PROFILES_DIR = Path(__file__).parent / "profiles"

Accelerator = Literal["auto", "cpu", "cuda", "mps"]


def _check_sha256(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise ValueError("sha256 must be 64 hexadecimal characters")
    return value.lower()


Sha256 = Annotated[str | None, AfterValidator(_check_sha256)]


class Settings(BaseModel):
    """Base for every settings model: strict about unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def digest(self) -> str:
        """A stable hash of the settings, used in cache keys and as an MLflow tag."""
        return config_digest(self.model_dump(mode="json"))


class RuntimeConfig(Settings):
    """Where and how a training stage runs (Lightning Fabric's vocabulary)."""

    accelerator: Accelerator = "auto"
    devices: int = Field(1, ge=1, description="Devices per node; >1 launches a multi-process run.")
    num_nodes: int = Field(1, ge=1)
    precision: str | None = Field(
        None,
        description="Fabric precision, e.g. '32-true', 'bf16-mixed', 'bf16-true'. "
        "Empty: '32-true' on CPU, 'bf16-mixed' on GPUs with bf16 support.",
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    keep_freed_memory: bool = Field(
        True,
        description="On a CPU with glibc (Linux): keep freed memory in the process while training, so a "
        "step reuses its large temporaries instead of page-faulting them in again; given back when "
        "training ends. glibc keeps them for the main thread only: a run started on another thread (a "
        "Prefect task) trains in a process of its own.",
    )


# ---------------------------------------------------------------------------------------------------------
# Data stage
# ---------------------------------------------------------------------------------------------------------


class DataConfig(Settings):
    """Pretraining text: where it comes from and how it is tokenized and split."""

    source: str = Field(THE_VERDICT_URL, description="http(s)/file URL or local path of a UTF-8 text file.")
    sha256: Sha256 = Field(None, description="Expected sha256 of the source; a mismatch is an error.")
    tokenizer: Literal["gpt2", "r50k_base"] = "gpt2"
    vocab_dir: str | None = Field(
        None,
        description="Directory with GPT-2 BPE files (vocab.bpe + encoder.json or r50k_base.tiktoken) "
        "for offline use; empty means tiktoken's own download and cache.",
    )
    train_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="Share of tokens used for training.")


# ---------------------------------------------------------------------------------------------------------
# Model and pretraining
# ---------------------------------------------------------------------------------------------------------


class ModelConfig(Settings):
    """A GPT architecture: a preset name plus optional overrides of its keys (the workshop's names)."""

    preset: str = Field("gpt2-small", description="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl|gpt-tiny|gpt-mini")
    vocab_size: int | None = None
    context_length: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0)
    qkv_bias: bool | None = None
    tie_weights: bool | None = None

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}


class TrainConfig(Settings):
    """The pretraining loop (defaults: the workshop's run)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)
    max_length: int | None = Field(None, ge=1, description="Window length; empty means the context length.")
    stride: int | None = Field(None, ge=1, description="Window stride; empty means max_length.")
    lr: float = Field(4e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    cosine_decay: bool = False
    min_lr: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    grad_accum_steps: int = Field(1, ge=1)
    eval_freq: int = Field(5, ge=1)
    eval_iter: int = Field(5, ge=1)
    start_context: str = "Every effort moves you"
    sample_tokens: int = Field(50, ge=0)
    checkpoint_every: int = Field(50, ge=1, description="Steps between resumable checkpoints.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    seed: int = 123
    init: Literal["pytorch", "gpt2"] = Field(
        "pytorch",
        description="Initial weights: 'pytorch' (PyTorch's defaults after manual_seed(seed), as the workshop; "
        "reproduces its initial losses) or 'gpt2' (N(0, 0.02), residual projections scaled down).",
    )
    runtime: RuntimeConfig = RuntimeConfig()


class PretrainConfig(Settings):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------------------
# GPT-2 weights
# ---------------------------------------------------------------------------------------------------------

GPT2Size = Literal["124M", "355M", "774M", "1558M"]


class WeightsConfig(Settings):
    """Which pretrained GPT-2 to fetch and from where."""

    enabled: bool = Field(
        True, description="Pipeline: fetch GPT-2 weights (off offline without a checkpoint; then finetune.base "
        "must be 'pretrained' or a directory).",
    )
    size: GPT2Size = "124M"
    source: Literal["openai", "huggingface"] = "huggingface"
    from_dir: str | None = Field(None, description="Local directory with an OpenAI or HF checkpoint.")
    openai_base_url: str = "https://openaipublic.blob.core.windows.net/gpt-2/models"
    openai_mirror_url: str | None = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
    hf_endpoint: str | None = Field(None, description="Hugging Face endpoint; empty means the default hub.")


# ---------------------------------------------------------------------------------------------------------
# Instruction data, finetuning
# ---------------------------------------------------------------------------------------------------------


class InstructDataConfig(Settings):
    source: str = Field(INSTRUCTION_DATA_URL, description="URL or path of a JSON / JSON Lines file.")
    sha256: Sha256 = None
    train_fraction: float = Field(0.85, gt=0.0, lt=1.0)
    shuffle: bool = False
    seed: int = 123
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of train used for validation.")
    limit: int | None = Field(None, ge=2, description="Use only the first N entries (quick runs).")


class LoRAConfig(Settings):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False


class LitGPTOptions(Settings):
    """Finetuning options only the LitGPT engine has (``finetune.litgpt.*``)."""

    quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8-training"] | None = Field(
        None, description="bitsandbytes quantization of the base (QLoRA); needs one CUDA GPU."
    )
    hf_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the HF token (else HF_TOKEN is used)."
    )


def _check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"unknown finetuning engine {name!r}; available: {', '.join(ENGINES)}")
    return name


class FinetuneConfig(Settings):
    engine: Annotated[str, AfterValidator(_check_engine)] = Field(
        "groundup", description="A finetuning engine of groundup.instruct.engines.ENGINES: groundup or litgpt."
    )
    base: str = Field(
        "gpt2-124M",
        description="groundup: a GPT-2 size ('gpt2-124M'), a groundup checkpoint dir, or 'pretrained' (the "
        "pipeline's own pretrained model); litgpt: a hub id (e.g. microsoft/phi-2) or a LitGPT checkpoint dir.",
    )
    epochs: int = Field(2, ge=1)
    global_batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    max_seq_length: int | None = Field(None, ge=8)
    mask_prompt: bool = False
    prompt_style: Literal["alpaca", "phi-3"] = "alpaca"
    eval_interval: int = Field(50, ge=1)
    log_interval: int = Field(10, ge=1)
    seed: int = 1337
    lora: LoRAConfig = LoRAConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    litgpt: LitGPTOptions = LitGPTOptions()

    @property
    def base_model(self) -> FinetuneBase:
        """``base``, parsed once into what it names (GPT-2 size, ``pretrained``, directory, hub id)."""
        return parse_base(self.base)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


class GenerationConfig(Settings):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = 123
    batch_size: int = Field(8, ge=1, description="Prompts of equal token length generated together.")
    limit: int | None = Field(None, ge=1, description="Answer only the first N test entries.")
    prompt_style: Literal["auto", "alpaca", "phi-3"] = Field(
        "auto",
        description="auto: each model's own format: a LitGPT checkpoint's prompt style (the one it was finetuned "
        "with, else its chat template), Alpaca for our GPT-2; or one style for both models.",
    )
    accelerator: Accelerator = "auto"
    compile: bool = Field(
        False,
        description="Our GPT: the one-token decoding step through torch.compile (the first batch compiles, "
        "then each token is cheaper: for many prompts on a GPU). Answers are unchanged.",
    )
    lookahead: int = Field(
        0,
        ge=0,
        description="Our GPT, greedy only: draft up to this many tokens a pass by prompt lookup (what followed "
        "the answer's last tokens earlier in the prompt or answer) and keep those the model agrees with. "
        "Answers are unchanged; fewer passes where answers copy their input. 0: one token a pass.",
    )

    @model_validator(mode="after")
    def _lookahead_is_greedy(self) -> GenerationConfig:
        if self.lookahead and self.temperature:
            raise ValueError(
                f"lookahead={self.lookahead} checks drafted tokens against greedy decoding: set "
                "generation.temperature=0, or generation.lookahead=0 to sample"
            )
        return self


class JudgeConfig(Settings):
    enabled: bool = Field(True, description="Off: the pipeline stops after the responses (no judge available).")
    backend: Literal["litgpt", "openai-compatible"] = "litgpt"
    model: str = Field("meta-llama/Meta-Llama-3-8B-Instruct", description="Hub id, checkpoint dir or served name.")
    base_url: str | None = Field(None, description="openai-compatible: e.g. http://127.0.0.1:11434/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key, if any.")
    quantize: Literal["bnb.nf4"] | None = None
    max_new_tokens: int = Field(50, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy: the same reply every time.")
    chat_template: str | None = Field(
        None, description="litgpt: a LitGPT prompt style (e.g. 'llama3'); empty means the model's own."
    )
    scoring: Literal["probability", "constrained", "free"] = Field(
        "probability",
        description="litgpt: 'probability' scores by the expected number from the probabilities the judge gives "
        "0-100, 'constrained' decodes only numbers (both: every reply a score), 'free' parses free text. "
        "openai-compatible: 'probability' asks for top_logprobs, else the reply is parsed.",
    )
    top_logprobs: int = Field(
        20, ge=1, le=20, description="openai-compatible, scoring 'probability': alternatives per token."
    )
    force_format: Literal["json_schema", "guided_regex", "none"] = Field(
        "json_schema",
        description="openai-compatible: ask the server for a score only (JSON-schema response_format; vLLM's "
        "guided_regex); a server that refuses gets plain requests, and replies are parsed either way.",
    )
    controls: int = Field(
        50, ge=0, description="Score the reference and another entry's reference for the first N test entries."
    )
    min_control_auc: float = Field(
        0.8, ge=0.0, le=1.0, description="Below this control AUC the judge is not trusted: no promotion."
    )
    timeout_s: float = Field(120.0, gt=0, description="openai-compatible: seconds per request.")
    retries: int = Field(3, ge=0, description="openai-compatible: retries on connection errors, 429 and 5xx.")
    bootstrap_samples: int = Field(10_000, ge=100)
    seed: int = 123
    accelerator: Accelerator = "auto"


class MCEvalConfig(Settings):
    """Multiple-choice benchmark evaluation through lm-eval (the ``eval`` extra)."""

    enabled: bool = False
    tasks: list[str] = ["mmlu_philosophy"]
    include_path: str | None = Field(None, description="Directory of local lm-eval task YAMLs (offline).")
    batch_size: int = Field(4, ge=1)
    limit: int | None = Field(None, ge=1)
    accelerator: Accelerator = "auto"


class EvaluateConfig(Settings):
    """The evaluation stage: responses, the judge and (optionally) multiple-choice benchmarks."""

    generation: GenerationConfig = GenerationConfig()
    judge: JudgeConfig = JudgeConfig()
    mc_eval: MCEvalConfig = MCEvalConfig()


# ---------------------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------------------


# The pipeline's stages in the order they start (``groundup.flows.pipeline``): what ``placement`` may name.
# ``evaluate_mc`` runs once per model, as ``evaluate_mc_base_model`` and ``evaluate_mc_finetuned_model``.
PIPELINE_STAGES = (
    "download_text", "tokenize_to_parquet", "record_corpus", "pretrain", "fetch_gpt2_weights", "split_instructions",
    "finetune", "generate_responses", "evaluate_mc", "judge_responses", "promote",
)  # fmt: skip
MC_EVAL_LABELS = ("base_model", "finetuned_model")


class PipelineConfig(Settings):
    output_dir: str = Field("artifacts", description="Root for data, checkpoints, results and mlflow.db.")
    experiment: str = "groundup"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    weights: WeightsConfig = WeightsConfig()
    instruct: InstructDataConfig = InstructDataConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generation: GenerationConfig = GenerationConfig()
    judge: JudgeConfig = JudgeConfig()
    mc_eval: MCEvalConfig = MCEvalConfig()
    placement: dict[str, str] = Field(
        default_factory=dict,
        description="Stages to run on a Prefect work pool instead of in-process, e.g. {finetune: groundup-gpu}.",
    )

    @property
    def pretrain(self) -> PretrainConfig:
        return PretrainConfig(data=self.data, model=self.model, train=self.train)

    @property
    def evaluate(self) -> EvaluateConfig:
        return EvaluateConfig(generation=self.generation, judge=self.judge, mc_eval=self.mc_eval)


# ---------------------------------------------------------------------------------------------------------
# Profiles and overrides
# ---------------------------------------------------------------------------------------------------------


# The old name of a settings error (a profile or override that does not fit the settings models).
ConfigError = SettingsError


def config_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def read_profile(profile: str | Path) -> dict[str, Any]:
    """A profile is a name from ``groundup/profiles`` or a path to a YAML file."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown profile {profile!r}; available: {', '.join(available_profiles())}")
    elif not path.is_file():
        raise ConfigError(f"profile file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {str(path)!r} must be a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars (``3``, ``1e-4``, ``true``, ``null``)."""
    result = json.loads(json.dumps(data))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return result


# What ``--sources-dir DIR`` looks for in DIR, and the settings each one fills in.
LOCAL_TEXT = "the-verdict.txt"
LOCAL_INSTRUCTIONS = "instruction-data.json"
LOCAL_GPT2 = "gpt2"  # an OpenAI (hparams.json) or Hugging Face (config.json) GPT-2 checkpoint
LOCAL_JUDGE = "judge"  # a LitGPT checkpoint
LOCAL_BASE = "base"  # a LitGPT checkpoint: the base model of the LitGPT finetuning engine


def local_sources(directory: str | Path) -> list[str]:
    """Overrides that point every source of the pipeline at files in ``directory`` (the offline option).

    Required: the pretraining text and the instruction data. Used when present: GPT-2 BPE files (in
    ``vocab/gpt2`` inside ``directory`` or beside it, which is the layout of ``../shared``), a LitGPT
    checkpoint in ``base/`` (finetuned with the LitGPT engine: a real model, real answers), else a GPT-2
    checkpoint in ``gpt2/``, and a LitGPT judge checkpoint in ``judge/``. With neither ``base/`` nor
    ``gpt2/`` the finetuning base is the model pretrained in the same run; without a judge, judging is
    skipped.
    """
    root = Path(directory).resolve()
    missing = [name for name in (LOCAL_TEXT, LOCAL_INSTRUCTIONS) if not (root / name).is_file()]
    if missing:
        raise ConfigError(f"sources dir {str(root)!r} lacks {', '.join(missing)}")
    overrides = [f"data.source={root / LOCAL_TEXT}", f"instruct.source={root / LOCAL_INSTRUCTIONS}"]
    vocab = local_vocab_dir(root)
    if vocab:
        overrides.append(f"data.vocab_dir={vocab}")
    gpt2, base = root / LOCAL_GPT2, root / LOCAL_BASE
    if (base / "lit_model.pth").is_file():
        overrides += ["finetune.engine=litgpt", f"finetune.base={base}", "weights.enabled=false"]
    elif (gpt2 / "hparams.json").is_file() or (gpt2 / "config.json").is_file():
        overrides.append(f"weights.from_dir={gpt2}")
    else:
        overrides += ["weights.enabled=false", f"finetune.base={PRETRAINED_BASE}"]
    judge = root / LOCAL_JUDGE
    if (judge / "lit_model.pth").is_file():
        overrides += ["judge.backend=litgpt", f"judge.model={judge}"]
    else:
        overrides.append("judge.enabled=false")
    return overrides


def local_vocab_dir(root: Path) -> Path | None:
    """The tokenizer checks the files; here only where they would be."""
    return next((d for d in (root / "vocab" / "gpt2", root.parent / "vocab" / "gpt2") if d.is_dir()), None)


def load_config(
    model: type[Settings] = PipelineConfig,
    profile: str | Path | None = "quickstart",
    overrides: list[str] | None = None,
    section: str | None = None,
) -> Settings:
    """Build settings from a profile plus overrides.

    ``section`` picks a sub-tree of a pipeline profile (e.g. ``"finetune"``) for a stage's own model;
    for ``PretrainConfig`` the profile's ``data``, ``model`` and ``train`` sections are used, for
    ``EvaluateConfig`` its ``generation``, ``judge`` and ``mc_eval`` sections.
    """
    data = read_profile(profile) if profile else {}
    if model is PretrainConfig and section is None:
        data = {k: data[k] for k in ("data", "model", "train") if k in data}
    elif model is EvaluateConfig and section is None:
        data = {k: data[k] for k in ("generation", "judge", "mc_eval") if k in data}
    elif section is not None:
        data = data.get(section, {}) or {}
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings for {model.__name__}: {problems}") from None
