"""The training config: typed dataclasses, loaded from a recipe TOML plus command-line overrides.

Resolution order (later wins): dataclass defaults -> `--recipe FILE.toml` -> named flags
(`--stage`, `--model`, `--tokenizer`, `--data`, `--teacher`, `--out`) -> `--section.key value` /
`--set section.key=value`. Values are parsed as TOML (`--set optim.lr=3e-4`, `--set kd.loss="reverse_kl"`
or bare strings). An unknown key or a value of the wrong type is a ValueError naming the key and
where it came from; the sections are then built once (frozen dataclasses) and `validate` checks
ranges and choices, each choice list being the registry that the name selects code from. The resolved
config is written to `<out>/config.toml`, which is itself a valid recipe.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from data.readers import TRAINING_FORMATS
from data.tasks import TASKS
from data.templates import STYLES
from losses import DIVERGENCES
from model.lora import LoRAConfig
from rl.grpo import GRPOConfig


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # training JSONL file
    format: str = "gsm8k"  # gsm8k (question/answer) | chat (messages) | prompt_completion
    style: str = "chat"  # prompt rendering for gsm8k rows: chat (ChatML) | fewshot (plain Question/Answer)
    # chat instruction appended to gsm8k questions (data/templates.py INSTRUCTIONS); stage rl: data/tasks.py's
    # task, whose rows, prompts and grader it uses (format is then unused)
    task: str = "synthetic"
    eval_path: str = ""  # optional held-out JSONL (same format): mean loss every `eval_every` steps
    max_len: int = 512  # tokens per example; longer ones are truncated by data/templates.py's policy
    micro_batch_size: int = 8  # examples per forward/backward on one rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step on one rank


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 10  # linear warmup from 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping


@dataclass(frozen=True)
class KDConfig:
    teacher: str = ""  # HF-layout directory of the teacher (stage kd)
    loss: str = "forward_kl"  # losses/distill.py DIVERGENCES: forward_kl = KL(p_T||q_S) | reverse_kl = KL(q_S||p_T) | jsd
    beta: float = 0.5  # generalized JSD interpolation (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # softens both distributions (Hinton et al. 2015)
    scale_t2: bool = False  # multiply the KD term by T^2 (keeps gradient scale across temperatures)
    alpha: float = 0.5  # loss = alpha * CE(labels) + (1 - alpha) * KD
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher may run in lower precision
    # On-policy KD (GKD, trainer/on_policy.py): the fraction lambda of steps that train on student samples
    on_policy_lambda: float = 0.0  # 0 = supervised KD only; 1 = every step on-policy
    on_policy_temperature: float = 1.0  # the student's sampling temperature (0 = greedy)
    on_policy_max_new_tokens: int = 256  # sampled completion length limit


@dataclass(frozen=True)
class GenConfig:
    """Stage gen: the model (a teacher) samples training traces for sequence-level KD (trainer/traces.py)."""
    n: int = 4  # samples per question
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    only_correct: bool = True  # keep only traces the gsm8k grader scores correct
    batch_size: int = 64  # prompts prefilled together


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"  # sft | kd | gen (teacher traces for sequence-level KD) | rl (GRPO)
    model: str = ""  # preset name from model.config.PRESETS (random init) or an HF-layout directory
    tokenizer: str = ""  # tokenizer directory; defaults to the model directory when that has one
    out: str = ""  # run directory
    seed: int = 0
    max_steps: int = 100  # optimizer steps (the cosine schedule ends here)
    stop_at: int = 0  # end this invocation after this step, checkpointed (preemptible jobs); 0 = max_steps
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block, for models that don't fit one GPU)
    activation_checkpointing: bool = False  # recompute each block in backward
    bf16: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    chunk_size: int = 1024  # tokens per chunk of the fused lm_head + loss (full logits never exist)
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when data.eval_path is set)
    save_every: int = 100  # training-state checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept on disk
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    # Stage rl: rl/grpo.py's knobs. There its micro_batch_size, chunk_size and max_grad_norm replace
    # data.micro_batch_size / grad_accum_steps, chunk_size and optim.grad_clip, and max_new_tokens bounds
    # the completions (data.max_len is unused); seed orders the prompts, grpo.seed seeds the sampling.
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # LoRA (model/lora.py) for stages sft, kd, rl: rank > 0 trains adapters on a frozen base.
    lora: LoRAConfig = field(default_factory=LoRAConfig)


# the nested sections of each config dataclass: field name -> its dataclass
SECTIONS = {TrainConfig: {"data": DataConfig, "optim": OptimConfig, "kd": KDConfig, "gen": GenConfig,
                          "grpo": GRPOConfig, "lora": LoRAConfig}}
STAGES = ("sft", "kd", "gen", "rl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = {"stage": STAGES, "parallel": ("ddp", "fsdp"), "data.format": tuple(TRAINING_FORMATS), "data.style": STYLES,
           "data.task": tuple(TASKS), "kd.loss": tuple(DIVERGENCES), "kd.teacher_dtype": tuple(DTYPES)}
POSITIVE = ("max_steps", "chunk_size", "log_every", "save_every", "keep_last", "data.max_len",
            "data.micro_batch_size", "data.grad_accum_steps", "optim.lr", "kd.temperature", "kd.on_policy_max_new_tokens",
            "gen.n", "gen.max_new_tokens", "gen.batch_size", "gen.top_p")
NON_NEGATIVE = ("stop_at", "eval_every", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "optim.eps",
                "gen.temperature", "kd.on_policy_temperature")
UNIT_INTERVAL = ("optim.min_lr_ratio", "optim.beta1", "optim.beta2", "kd.beta", "kd.alpha", "kd.on_policy_lambda",
                 "gen.top_p")


def set_value(values: dict, key: str, value, source: str, text: str | None = None):
    """values[section][name] = value for the dotted `key`, checking the key exists and the type matches.

    `text`: the raw command-line spelling; a string field takes it as is (a path named 123 stays "123").
    """
    *sections, name = key.split(".")
    target, table = TrainConfig, values
    for section in sections:
        if section not in SECTIONS.get(target, {}):
            raise ValueError(f"{source}: unknown config key {key!r}")
        target, table = SECTIONS[target][section], table.setdefault(section, {})
    types = {f.name: f.type for f in fields(target)}
    if name not in types:
        raise ValueError(f"{source}: unknown config key {key!r}")
    if name in SECTIONS.get(target, {}):
        raise ValueError(f"{source}: config key {key!r} is a section; set its fields ({key}.<name>)")
    expected = {"str": str, "int": int, "float": float, "bool": bool}[types[name]]
    if expected is float and type(value) is int:
        value = float(value)
    if expected is str and text is not None and type(value) is not str:
        value = text
    if type(value) is not expected:
        raise ValueError(f"{source}: config key {key!r} expects {expected.__name__}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise ValueError(f"{source}: config key {key!r} must be a finite number, got {value!r}")
    table[name] = value


def apply_dict(values: dict, table: dict, source: str, prefix: str = ""):
    """Apply a (nested) TOML table: sections recurse, scalars go through set_value."""
    for name, value in table.items():
        key = prefix + name
        if isinstance(value, dict):
            apply_dict(values, value, source, key + ".")
        else:
            set_value(values, key, value, source)


def build(cls, values: dict, prefix: str = ""):
    """The frozen dataclass `cls` from nested `values` (defaults for what is absent); a section's own checks
    (__post_init__) become errors naming the section."""
    kwargs = {name: build(section, values.get(name, {}), f"{prefix}{name}.")
              for name, section in SECTIONS.get(cls, {}).items()}
    try:
        return cls(**{**values, **kwargs})
    except ValueError as e:
        raise ValueError(f"config section [{prefix.rstrip('.')}]: {e}") from None


def parse_value(text: str):
    """A command-line value as TOML (numbers, booleans, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def get_value(config: TrainConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(config: TrainConfig):
    """Out-of-range values and missing required settings are errors naming the key."""
    for key, allowed in CHOICES.items():
        if get_value(config, key) not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {get_value(config, key)!r}")
    for keys, ok, what in ((POSITIVE, lambda v: v > 0, "> 0"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
                           (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for key in keys:
            if not ok(get_value(config, key)):
                raise ValueError(f"config key {key!r} must be {what}, got {get_value(config, key)!r}")
    if config.lora.rank and (config.stage == "gen" or config.parallel != "ddp"):
        raise ValueError(f"config key 'lora.rank' > 0 needs a training stage (sft, kd, rl) and parallel = 'ddp' "
                         f"(LoRA replicates the frozen base; FSDP is for models that do not fit), got stage "
                         f"{config.stage!r}, parallel {config.parallel!r}")
    if config.stage == "gen" and config.data.format != "gsm8k":
        raise ValueError(f"stage 'gen' reads questions with references: config key 'data.format' must be "
                         f"'gsm8k', got {config.data.format!r}")
    if config.stage == "kd" and config.kd.on_policy_lambda and config.parallel != "ddp":
        raise ValueError("config key 'kd.on_policy_lambda' > 0 needs config key 'parallel' = 'ddp': ranks sample "
                         "completions of different lengths, and FSDP would need every rank in every forward")
    if config.stage == "rl" and config.parallel != "ddp":
        raise ValueError("stage 'rl' needs config key 'parallel' = 'ddp': ranks decode rollouts of different "
                         "lengths, and FSDP would need every rank in every forward")
    for key in ("model", "out", "data.path") + (("kd.teacher",) if config.stage == "kd" else ()):
        if not get_value(config, key):
            raise ValueError(f"config key {key!r} is required (stage {config.stage})")


def load_config(recipe: str | None, named: dict, overrides: list[tuple[str, str]]) -> TrainConfig:
    """Defaults <- recipe TOML <- named flags (already typed) <- `key=value` overrides (TOML-parsed)."""
    values: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {recipe} not found")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{recipe}: invalid TOML: {e}") from None
        apply_dict(values, table, recipe)
    for key, value in named.items():
        if value is not None:
            set_value(values, key, value, f"--{key.replace('.', '-')}")
    for key, text in overrides:
        set_value(values, key, parse_value(text), f"override {key}={text}", text)
    config = build(TrainConfig, values)
    validate(config)
    return config


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)  # JSON string escapes are valid TOML


def to_toml(config: TrainConfig) -> str:
    """The resolved config as a recipe: top-level scalars, then one [section] per nested dataclass."""
    table = asdict(config)
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for section, values in table.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"
