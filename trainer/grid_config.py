"""The config of the study grid on real checkpoints (`study.py --config FILE.toml`, trainer/grid.py): frozen
dataclasses read from TOML, every key typed and checked before any file is read or any stage runs.

    out, seeds, methods   the run directory, the students' seeds, the methods to run (METHODS)
    [models]              base, instruct, teacher: local HF-layout directories; tokenizer (default: base's)
    [data]                task: data/tasks.py task of the training rows, GSM8K format (gsm8k, synthetic) or
                          HumanEval format (humaneval, synthetic-code: the code track); train: its JSONL;
                          limit: the first N rows (0: all); traces: a prompt/completion JSONL that seq_kd trains
                          on as it is (else stage gen samples the teacher); style: chat | fewshot prompts
    [eval]                benchmarks = {task: file} (any data/tasks.py task: gsm8k, math, humaneval, ...);
                          limit, max_new_tokens, pass_k (sampled pass@k), temperature, batch_size
    [stages.<kind>]       recipe: a train.py recipe (recipes/*.toml); set = {train.py config key: value} over
                          it. Kinds: sft, lora (LoRA SFT), gen (the teacher's traces), kd, rl
    [launch]              jobs: stages at once; nproc_per_node: 0 runs train.py in-process, N > 0 as
                          `torchrun --nnodes M --nproc_per_node N <torchrun_args> train.py ...` per stage
    [cost]                gpu_flops (peak FLOP/s of one GPU) and mfu, for the cost preview (trainer/grid_cost.py);
                          assume = {params = {model key: N}, chars_per_token = C}: stated figures the preview uses
                          only where a [models] directory (params) or the tokenizer (C > 0) is absent; a run
                          still refuses an absent directory
    [paper]               source, and figures = {method: {benchmark: %}}: reported, not reproduced

Paths are relative to the directory study.py runs in, as train.py's are. An error is one line naming
the config file and key: "FILE: key: what is wrong".
"""
from __future__ import annotations

import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from data.readers import load_gsm8k, load_humaneval, load_prompt_completion, read_jsonl
from data.tasks import TASKS, load_rows
from data.templates import STYLES
from trainer.run import flat

MODEL_KEYS = ("base", "instruct", "teacher")
STAGE_KINDS = {"sft": "sft", "lora": "sft", "gen": "gen", "kd": "kd", "rl": "rl"}  # [stages] kind -> train.py stage
# train.py settings the grid makes itself (from seeds, [data] and the method): a stage's `set` may not name them
GRID_KEYS = ("stage", "model", "tokenizer", "out", "data.path", "kd.teacher", "seed", "data.task", "data.style",
             "data.format", "kd.loss", "grpo.seed")


@dataclass(frozen=True)
class Method:
    name: str
    what: str  # one line for results.md
    start: str  # a [models] key, or the method whose final model it continues
    stage: str = ""  # the [stages] kind it trains with; "" = evaluated as it is
    sets: dict = field(default_factory=dict)  # its own train.py settings
    traces: bool = False  # trains on teacher traces: data.traces, or the teacher's samples (stage gen)


METHODS = (
    Method("teacher", "the teacher checkpoint as it is", "teacher"),
    Method("base", "the base student as it is", "base"),
    Method("instruct", "the Instruct student as it is", "instruct"),
    Method("sft", "base + SFT on the training rows", "base", "sft"),
    Method("sft_lora", "base + LoRA SFT on the training rows (adapters merged into final/)", "base", "lora"),
    Method("seq_kd", "base + SFT on teacher traces (sequence-level KD)", "base", "sft", traces=True),
    Method("kd_forward", "base + logit KD, alpha*CE + (1-alpha)*KL(teacher||student)", "base", "kd",
           {"kd.loss": "forward_kl"}),
    Method("kd_reverse", "base + logit KD, alpha*CE + (1-alpha)*KL(student||teacher)", "base", "kd",
           {"kd.loss": "reverse_kl"}),
    Method("grpo", "instruct + GRPO on the training questions (reward: the task's grader)", "instruct", "rl"),
    Method("sft_grpo", "sft + the same GRPO", "sft", "rl"),
    Method("kd_grpo", "kd_forward + the same GRPO", "kd_forward", "rl"),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Models:
    base: str = ""
    instruct: str = ""
    teacher: str = ""
    tokenizer: str = ""  # default: base's directory

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.base


@dataclass(frozen=True)
class Data:
    task: str = "gsm8k"
    train: str = ""
    limit: int = 0
    traces: str = ""
    style: str = "chat"

    @property
    def code(self) -> bool:
        """The code track: HumanEval-format rows, SFT on their fenced solutions, GRPO with the sandbox grader."""
        return TASKS[self.task].load is load_humaneval


@dataclass(frozen=True)
class Eval:
    benchmarks: dict[str, str] = field(default_factory=dict)
    limit: int = 0
    max_new_tokens: int = 512
    pass_k: int = 4
    temperature: float = 0.8
    batch_size: int = 32


@dataclass(frozen=True)
class StageRecipe:
    recipe: str = ""
    set: dict = field(default_factory=dict)  # nested TOML tables are flattened to dotted keys


@dataclass(frozen=True)
class Launch:
    jobs: int = 1
    nproc_per_node: int = 0
    nnodes: int = 1
    torchrun_args: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes if self.nproc_per_node else 1

    @property
    def torchrun(self) -> tuple[str, ...]:
        """The command a training stage runs under; () in-process."""
        if not self.nproc_per_node:
            return ()
        return ("torchrun", f"--nnodes={self.nnodes}", f"--nproc_per_node={self.nproc_per_node}", *self.torchrun_args)


@dataclass(frozen=True)
class Assume:
    params: dict[str, int] = field(default_factory=dict)  # [models] key -> parameters
    chars_per_token: float = 0.0  # 0: no assumption (an absent tokenizer's figures are ?)


@dataclass(frozen=True)
class Cost:
    gpu_flops: float = 989e12  # H100 SXM, dense bf16
    mfu: float = 0.35
    assume: Assume = field(default_factory=Assume)  # in place of absent files, for the preview only


@dataclass(frozen=True)
class Paper:
    source: str = ""
    figures: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class GridConfig:
    out: str = ""
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ()
    models: Models = field(default_factory=Models)
    data: Data = field(default_factory=Data)
    eval: Eval = field(default_factory=Eval)
    stages: dict[str, StageRecipe] = field(default_factory=dict)
    launch: Launch = field(default_factory=Launch)
    cost: Cost = field(default_factory=Cost)
    paper: Paper = field(default_factory=Paper)


SECTIONS = {c.__name__: c for c in (Models, Data, Eval, StageRecipe, Launch, Assume, Cost, Paper)}
SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def typed(value, kind: str, key: str):
    """`value` as the annotation `kind` says (a section, tuple[...], dict[str, ...], a scalar, or any table)."""
    if kind in SECTIONS or kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return build(SECTIONS[kind], value, key + ".") if kind in SECTIONS else flat(value)
    if kind.startswith("tuple["):
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return tuple(typed(v, kind[6:-6], f"{key}[{i}]") for i, v in enumerate(value))
    if kind.startswith("dict[str, "):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return {k: typed(v, kind[10:-1], f"{key}.{k}") for k, v in value.items()}
    if kind == "float" and type(value) is int:
        value = float(value)
    if type(value) is not SCALARS[kind]:
        raise ValueError(f"{key}: expected {kind}, got {value!r}")
    return value


def build(cls, table: dict, prefix: str = ""):
    """The dataclass `cls` from a TOML table: unknown keys and ill-typed values are errors naming the key."""
    kinds = {f.name: f.type for f in fields(cls)}
    for name in table:
        if name not in kinds:
            raise ValueError(f"{prefix}{name}: unknown key (known in this table: {', '.join(kinds)})")
    return cls(**{name: typed(value, kinds[name], prefix + name) for name, value in table.items()})


def load_grid(path: str) -> GridConfig:
    """The config at `path`, typed and checked (check); errors name the key (`about` adds the file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"study config {path} not found")
    with about(path):
        grid = build(GridConfig, tomllib.loads(Path(path).read_text()))
        check(grid)
    return grid


@contextmanager
def about(path: str):
    """A user error inside becomes one ValueError "path: message" (the message names the key)."""
    try:
        yield
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: {e}") from None


def require(ok: bool, key: str, message: str):
    if not ok:
        raise ValueError(f"{key}: {message}")


def check(g: GridConfig):
    """Values, choices and what the methods need, key by key (files are read later: trainer/grid.py)."""
    require(bool(g.out), "out", "the run directory is required")
    require(bool(g.seeds) and len(set(g.seeds)) == len(g.seeds) and min(g.seeds) >= 0, "seeds",
            f"expected distinct seeds >= 0, got {list(g.seeds)}")
    require(bool(g.methods), "methods", "name at least one method")
    for name in g.methods:
        require(name in BY_NAME, "methods", f"unknown method {name!r} (known: {', '.join(BY_NAME)})")
    require(len(set(g.methods)) == len(g.methods), "methods", f"a method is named twice: {list(g.methods)}")
    check_data(g.data)
    check_eval(g.eval)
    for name in g.methods:
        check_method(g, BY_NAME[name])
    for kind, stage in g.stages.items():
        require(kind in STAGE_KINDS, f"stages.{kind}", f"unknown stage kind (known: {', '.join(STAGE_KINDS)})")
        for key in stage.set:
            require(key not in GRID_KEYS, f"stages.{kind}.set.{key}",
                    "the grid sets this key itself (from seeds, [models], [data] and the method)")
    launch, cost = g.launch, g.cost
    require(launch.jobs >= 1, "launch.jobs", f"must be >= 1, got {launch.jobs}")
    require(launch.nproc_per_node >= 0, "launch.nproc_per_node", f"must be >= 0, got {launch.nproc_per_node}")
    require(launch.nnodes == 1 or launch.nproc_per_node > 0, "launch.nnodes",
            "several nodes need torchrun: set launch.nproc_per_node")
    require(cost.gpu_flops > 0, "cost.gpu_flops", f"must be > 0, got {cost.gpu_flops}")
    require(0 < cost.mfu <= 1, "cost.mfu", f"must be in (0, 1], got {cost.mfu}")
    for key, n in cost.assume.params.items():
        require(key in MODEL_KEYS, f"cost.assume.params.{key}", f"unknown model key (known: {', '.join(MODEL_KEYS)})")
        require(n > 0, f"cost.assume.params.{key}", f"must be > 0, got {n}")
    require(cost.assume.chars_per_token >= 0, "cost.assume.chars_per_token",
            f"must be > 0 (or 0: no assumption), got {cost.assume.chars_per_token}")
    for name, figures in g.paper.figures.items():
        require(name in g.methods, f"paper.figures.{name}", "not a method of this config")
        for bench, value in figures.items():
            require(bench in g.eval.benchmarks, f"paper.figures.{name}.{bench}", "not a benchmark of this config")
            require(0 <= value <= 100, f"paper.figures.{name}.{bench}", f"a percentage, got {value}")


def check_data(d: Data):
    require(d.task in TASKS and TASKS[d.task].load in (load_gsm8k, load_humaneval), "data.task",
            f"training rows are GSM8K format (gsm8k, synthetic) or HumanEval format (humaneval, synthetic-code), "
            f"got {d.task!r}")
    require(bool(d.train), "data.train", "the training JSONL is required")
    require(d.limit >= 0, "data.limit", f"must be >= 0 (0: every row), got {d.limit}")
    require(d.style in STYLES, "data.style", f"must be one of {STYLES}, got {d.style!r}")


def check_eval(e: Eval):
    require(bool(e.benchmarks), "eval.benchmarks", "name at least one benchmark: {task = file}")
    for name in e.benchmarks:
        require(name in TASKS, f"eval.benchmarks.{name}",
                f"unknown benchmark: no data/tasks.py task (and grader) of that name (known: {', '.join(TASKS)})")
    require(e.limit >= 0, "eval.limit", f"must be >= 0 (0: every problem), got {e.limit}")
    for key in ("max_new_tokens", "pass_k", "batch_size", "temperature"):
        require(getattr(e, key) > 0, f"eval.{key}", f"must be > 0, got {getattr(e, key)}")


def check_method(g: GridConfig, m: Method):
    """What method m needs: its start (a model directory or a method of this config), its stage's recipe
    table, and the teacher when it distils from it."""
    if m.start in MODEL_KEYS:
        require(bool(getattr(g.models, m.start)), f"models.{m.start}",
                f"method {m.name!r} starts from it: name its directory")
    else:
        require(m.start in g.methods, "methods", f"{m.name!r} continues {m.start!r}: add {m.start!r} to the methods")
    if m.stage:
        require(m.stage in g.stages, f"stages.{m.stage}", f"method {m.name!r} trains with it: give its recipe and set")
    sampled = m.traces and not g.data.traces
    if m.stage == "kd" or sampled:
        require(bool(g.models.teacher), "models.teacher",
                f"method {m.name!r} learns from the teacher: name its directory")
    if sampled:
        require(not g.data.code, "data.traces", f"method {m.name!r} on the code track needs a trace file (stage gen "
                                                f"samples and grades GSM8K-format questions only)")
        require("gen" in g.stages, "stages.gen", f"method {m.name!r} samples the teacher's traces: give its settings")


# ------------------------------------------------------------------ the files it names

@dataclass(frozen=True)
class Inputs:
    """The config's files, read and checked: the training file's first data.limit records (as written, and as
    data/tasks.py rows), data.traces' prompt/completion rows, and each benchmark's first eval.limit problems."""
    records: list[dict]
    rows: list[dict]
    traces: list[dict]
    benchmarks: dict[str, list[dict]]


def read(key: str, reader, path: str, *args) -> list[dict]:
    """reader(*args, path), its error (naming the file and line) prefixed with the config key."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: file {path} not found")
    try:
        rows = reader(*args, path)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if not rows:
        raise ValueError(f"{key}: {path} holds no rows")
    return rows


def read_inputs(g: GridConfig) -> Inputs:
    """Every file the config names, through its reader: data.traces as stage sft will read it."""
    cut = lambda rows, limit: rows[:limit] if limit else rows  # noqa: E731
    rows = cut(read("data.train", load_rows, g.data.train, g.data.task), g.data.limit)
    traces = read("data.traces", load_prompt_completion, g.data.traces) if g.data.traces else []
    benchmarks = {name: cut(read(f"eval.benchmarks.{name}", load_rows, path, name), g.eval.limit)
                  for name, path in g.eval.benchmarks.items()}
    return Inputs(cut(read_jsonl(g.data.train), g.data.limit), rows, traces, benchmarks)


def missing_models(g: GridConfig) -> list[str]:
    """"models.<key>: directory X not found" for each named directory that is absent."""
    named = {key: getattr(g.models, key) for key in (*MODEL_KEYS, "tokenizer") if getattr(g.models, key)}
    return [f"models.{key}: directory {path} not found" for key, path in named.items() if not Path(path).is_dir()]
