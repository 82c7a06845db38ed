"""The cost preview of a study grid (trainer/grid.py), before anything runs: per stage, the tokens it
processes and the GPU time they take at a stated model FLOPs utilisation, counting 6·P FLOPs per trained
token and 2·P per token of a forward pass (Kaplan et al. 2020, arXiv:2001.08361), P the parameters:

    sft, kd   6·P·T, T = optimizer steps x global batch x mean tokens of the stage's own tokenization of its
              training file (prompt and completion, truncated at data.max_len); logit KD adds the teacher's
              forward, 2·P_teacher·T
    gen       2·P_teacher·T, T = questions x gen.n x (mean prompt tokens + gen.max_new_tokens)
    rl        T = steps x prompts_per_step x group_size x (mean prompt tokens + grpo.max_new_tokens): sampling
              2·P·T, grpo.mu updates of 6·P·T, the KL reference's forward 2·P·T when grpo.beta > 0
    eval      2·P·T, T = problems x (1 greedy + pass_k samples) x (mean prompt tokens + max_new_tokens)

hours = FLOPs / (gpu_flops x mfu x GPUs) / 3600, the wall time on the stage's GPUs (training and gen: the
launch's world size; eval: one), and GPU-hours = hours x GPUs. Generated text is counted at max_new_tokens,
so figures with generation are upper bounds ("<="); so is SFT on traces the teacher has yet to sample.
P comes from each model directory's config.json (model/config.py num_parameters; a trained method has its
start's architecture), T from its tokenizer. The preview runs with directories absent (a run refuses them): a
figure that needs one is "?", unless config [cost] assume states what it needs, P as assume.params.<key> and T
at assume.chars_per_token characters per token (AssumedTokenizer). A figure computed from an assumption is
marked "~"; cost.md and cost.json list the assumptions. Figures from real files are never assumed.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.tasks import render_prompts
from model.tokenizer import ENDOFTEXT, Tokenizer
from trainer.batches import steps_per_epoch, tokenize_row
from trainer.config import DataConfig, TrainConfig
from trainer.grid_config import GridConfig, Inputs
from trainer.report import table
from trainer.stages import Stage


@dataclass(frozen=True)
class Planned:
    """A stage of the grid and what its cost depends on."""
    stage: Stage
    kind: str  # train.py stage (sft, kd, gen, rl), "eval" or "data"
    method: str  # the method it belongs to ("" for data)
    seed: int
    model: str  # the [models] key whose architecture runs (a trained method: its start's)
    key: str  # the config key it runs with: stages.<kind>, eval
    config: TrainConfig | None = None  # train.py's resolved config (training and gen stages)
    samples_of: TrainConfig | None = None  # sft on traces stage gen has yet to sample: gen's config


@dataclass(frozen=True)
class StageCost:
    stage: str  # its directory, relative to the run directory
    kind: str
    model: str
    params: int | None
    steps: int  # optimizer steps (0: no training)
    sequences: int  # sequences processed (trained, sampled or evaluated)
    epochs: float | None  # sequences / training examples (training stages)
    tokens: float | None
    flops: float | None
    gpus: int
    bound: bool  # generated lengths counted at their maximum: an upper bound
    assumed: tuple[str, ...] = ()  # its figures computed from config [cost] assume: params, tokens, flops (hours)

    def hours(self, gpu_flops: float, mfu: float) -> float | None:
        return None if self.flops is None else self.flops / (gpu_flops * mfu * self.gpus) / 3600


@dataclass(frozen=True)
class AssumedTokenizer:
    """The stand-in for an absent tokenizer (config [cost] assume.chars_per_token): a text of n characters is
    ceil(n / chars_per_token) tokens. Prompts render in ChatML as Tokenizer renders them, without a default
    system message (the checkpoint's template, which may add one, is not there to read)."""
    chars_per_token: float
    default_system_prompt = None
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [self.eos_id] * math.ceil(len(text) / self.chars_per_token)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ENDOFTEXT * len(ids)  # its one id stands for any token; fewshot examples end with decode([eos_id])

    apply_chat_template = Tokenizer.apply_chat_template


@dataclass
class Measures:
    """What the figures come from: parameters per [models] key (None: its directory is absent and no
    assumption states them), the tokenizer (an AssumedTokenizer in place of an absent one; None: no assumption),
    the rows of the grid's training files ({path: rows}) and the config's inputs."""
    grid: GridConfig
    params: dict[str, int | None]
    tokenizer: Tokenizer | AssumedTokenizer | None
    files: dict[str, list[dict]]
    inputs: Inputs
    assumed: tuple[str, ...] = ()  # the [models] keys whose params are config [cost] assume.params'
    lengths: dict = field(default_factory=dict)  # (path, DataConfig) -> mean tokens per example (cache)

    @property
    def tokens_assumed(self) -> bool:
        return isinstance(self.tokenizer, AssumedTokenizer)

    def assumptions(self) -> dict:
        """{"params": {key: parameters}, "chars_per_token": C or None}: what the figures assume."""
        return {"params": {key: self.params[key] for key in self.assumed},
                "chars_per_token": self.tokenizer.chars_per_token if self.tokens_assumed else None}

    def example_tokens(self, path: str, data: DataConfig) -> float:
        """Mean tokens per training example of the file at `path`, tokenized as the stage does."""
        if (path, data) not in self.lengths:
            lengths = []
            for i, row in enumerate(self.files[path]):
                try:
                    lengths.append(len(tokenize_row(row, data, self.tokenizer)[0]))
                except ValueError as e:  # as trainer/batches.py's load_examples will say it
                    raise ValueError(f"{path}: row {i + 1} (blank lines not counted): {e}") from None
            self.lengths[path, data] = statistics.fmean(lengths)
        return self.lengths[path, data]

    def prompt_tokens(self, rows: list[dict], task: str | None = None) -> float:
        """Mean tokens of the rendered prompts of `rows` of `task` (default: the training task's): eval's,
        rl's and gen's prompts alike."""
        prompts = render_prompts(self.tokenizer, rows, task or self.grid.data.task, self.grid.data.style)
        return statistics.fmean(len(self.tokenizer.encode(p)) for p in prompts)


@dataclass(frozen=True)
class Figures:
    steps: int
    sequences: int
    epochs: float | None
    tokens: float | None  # None: the tokenizer is absent
    passes: dict[str, int]  # FLOPs per token per parameter of each [models] key it runs: 2 forward, 6 trained
    gpus: int
    bound: bool


def times(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a * b


def training_figures(p: Planned, m: Measures) -> Figures:
    """sft and kd: steps x global batch examples of the stage's training file (or traces yet to be sampled)."""
    cfg, world = p.config, m.grid.launch.world_size
    batch = cfg.data.micro_batch_size * cfg.data.grad_accum_steps * world
    sequences, sampled, epochs, per_example = cfg.max_steps * batch, p.samples_of is not None, None, None
    if not sampled and cfg.data.path in m.files:  # code track without a tokenizer: its SFT rows are unknown
        examples = len(m.files[cfg.data.path])
        steps_per_epoch(examples, batch, cfg.data.path)  # fewer examples than a batch: an error now, not later
        epochs = sequences / examples
    if m.tokenizer is not None:
        per_example = (min(cfg.data.max_len, m.prompt_tokens(m.inputs.rows) + p.samples_of.gen.max_new_tokens + 1)
                       if sampled else m.example_tokens(cfg.data.path, cfg.data))
    passes = {p.model: 6, "teacher": 2} if p.kind == "kd" else {p.model: 6}
    return Figures(cfg.max_steps, sequences, epochs, times(sequences, per_example), passes, world, sampled)


def gen_figures(p: Planned, m: Measures) -> Figures:
    """gen: gen.n samples of every training question."""
    g, per_sample = p.config.gen, None
    if m.tokenizer is not None:
        per_sample = m.prompt_tokens(m.inputs.rows) + g.max_new_tokens
    sequences = len(m.inputs.rows) * g.n
    return Figures(0, sequences, None, times(sequences, per_sample), {p.model: 2}, m.grid.launch.world_size, True)


def rl_figures(p: Planned, m: Measures) -> Figures:
    """rl: group_size rollouts of prompts_per_step questions per step, sampled then trained on mu times."""
    cfg, per_rollout = p.config, None
    steps_per_epoch(len(m.inputs.rows), cfg.grpo.prompts_per_step, cfg.data.path)
    if m.tokenizer is not None:
        per_rollout = m.prompt_tokens(m.inputs.rows) + cfg.grpo.max_new_tokens
    sequences = cfg.max_steps * cfg.grpo.prompts_per_step * cfg.grpo.group_size
    passes = 2 + 6 * cfg.grpo.mu + (2 if cfg.grpo.beta > 0 else 0)
    return Figures(cfg.max_steps, sequences, None, times(sequences, per_rollout), {p.model: passes},
                   m.grid.launch.world_size, True)


def eval_figures(p: Planned, m: Measures) -> Figures:
    """eval: every benchmark problem, once greedy and pass_k times sampled, on one GPU."""
    e, benchmarks = m.grid.eval, m.inputs.benchmarks
    sequences = sum(len(rows) for rows in benchmarks.values()) * (1 + e.pass_k)
    tokens = None
    if m.tokenizer is not None:
        tokens = sum(len(rows) * (1 + e.pass_k) * (m.prompt_tokens(rows, task) + e.max_new_tokens)
                     for task, rows in benchmarks.items())
    return Figures(0, sequences, None, tokens, {p.model: 2}, 1, True)


FIGURES = {"sft": training_figures, "kd": training_figures, "gen": gen_figures, "rl": rl_figures, "eval": eval_figures}


def stage_cost(p: Planned, m: Measures, out: Path) -> StageCost:
    """The figures of one planned stage (None where a file is absent and no assumption stands in), and which of
    them are assumed; an input that the stage would refuse (fewer examples than a batch, an example with nothing
    to learn) is an error naming its config key."""
    try:
        f = FIGURES[p.kind](p, m)
    except ValueError as e:
        raise ValueError(f"{p.key} ({p.stage.path.relative_to(out)}): {e}") from None
    known = all(m.params[key] is not None for key in f.passes)
    per_token = sum(n * m.params[key] for key, n in f.passes.items()) if known else None
    flops = times(f.tokens, per_token)
    params_assumed = any(key in m.assumed for key in f.passes)
    assumed = tuple(name for name, yes in (("params", p.model in m.assumed), ("tokens", m.tokens_assumed),
                                           ("flops", flops is not None and (m.tokens_assumed or params_assumed)))
                    if yes)
    return StageCost(str(p.stage.path.relative_to(out)), p.kind, p.model, m.params[p.model], f.steps, f.sequences,
                     f.epochs, f.tokens, flops, f.gpus, f.bound, assumed)


def human(x: float | None, digits: int = 1) -> str:
    """1234567 -> 1.2M; None -> ?"""
    if x is None:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return f"{x:.{digits}f}" if x != int(x) else str(int(x))


def notes(missing: list[str], assumed: dict) -> list[str]:
    """cost.md's closing lines: the absent files, and the assumptions (Measures.assumptions()) standing in."""
    lines = [f"Missing: {line}" for line in missing]
    if missing:
        lines.append("A figure that needs a missing file is ? (the preview reads each model's config.json and the "
                     "tokenizer files only), or ~ where config [cost] assume states what it needs.")
    params = ", ".join(f"models.{key} params {human(n, 2)}" for key, n in assumed["params"].items())
    parts = [f"{params} (config [cost] assume.params)"] if params else []
    if assumed["chars_per_token"]:
        parts.append(f"tokens at {assumed['chars_per_token']:g} characters per token (no tokenizer read)")
    lines += [f"Assumed: {'; '.join(parts)}."] if parts else []
    return ["", *lines] if lines else []


def cost_lines(g: GridConfig, costs: list[StageCost], missing: list[str], assumed: dict, source: str) -> list[str]:
    """cost.md: the settings, one row per stage, the totals, what is missing and what is assumed in its place."""
    c = g.cost
    rows, total_hours, total_gpu_hours, complete, guessed = [], 0.0, 0.0, True, False
    for s in costs:
        hours = s.hours(c.gpu_flops, c.mfu)
        complete &= hours is not None
        guessed |= "flops" in s.assumed
        total_hours += hours or 0.0
        total_gpu_hours += (hours or 0.0) * s.gpus
        le, flops = "<= " if s.bound else "", "~" if "flops" in s.assumed else ""
        rows.append([s.stage, s.kind, s.model, ("~" if "params" in s.assumed else "") + human(s.params),
                     str(s.steps or ""), str(s.sequences), "" if s.epochs is None else f"{s.epochs:.2f}",
                     le + ("~" if "tokens" in s.assumed else "") + human(s.tokens),
                     le + flops + ("?" if s.flops is None else f"{s.flops / 1e15:.3g}"), str(s.gpus),
                     le + flops + ("?" if hours is None else f"{hours:.3g}"),
                     le + flops + ("?" if hours is None else f"{hours * s.gpus:.3g}")])
    unknown, about = "" if complete else " (without the stages marked ?)", "~" if guessed else ""
    return [f"# Cost preview of {source}", "",
            f"Per stage: tokens processed and GPU time at {c.gpu_flops / 1e12:g} TFLOP/s per GPU and MFU {c.mfu} "
            f"(config [cost]); FLOPs = 6 x params x tokens trained, 2 x params x tokens forwarded (logit KD's "
            f"teacher, sampling, evaluation): trainer/grid_cost.py. hours: wall time on the stage's GPUs. "
            f"<=: generated text counted at max_new_tokens (an upper bound)."
            + (" ~: computed from an assumption (below) in place of an absent file." if any(assumed.values())
               else ""), "",
            *table(["stage", "kind", "model", "params", "steps", "sequences", "epochs", "tokens", "PFLOP", "GPUs",
                    "hours", "GPU-hours"], rows), "",
            f"Total{unknown}: {about}{total_gpu_hours:.3g} GPU-hours; {about}{total_hours:.3g} hours with the stages "
            f"one after another ({g.launch.jobs} at a time: launch.jobs).",
            *notes(missing, assumed)]


def write_cost(out: Path, g: GridConfig, costs: list[StageCost], missing: list[str], assumed: dict,
               source: str) -> str:
    """cost.md and cost.json in `out` (`assumed`: Measures.assumptions()); returns cost.md's text."""
    text = "\n".join(cost_lines(g, costs, missing, assumed, source)) + "\n"
    (out / "cost.md").write_text(text)
    stages = [{**asdict(s), "hours": s.hours(g.cost.gpu_flops, g.cost.mfu)} for s in costs]
    (out / "cost.json").write_text(json.dumps({"gpu_flops": g.cost.gpu_flops, "mfu": g.cost.mfu, "stages": stages,
                                               "missing": missing, "assumed": assumed}, indent=2) + "\n")
    return text
