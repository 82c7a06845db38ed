"""The study in miniature: a teacher, a base student and student variants on the synthetic task, on CPU.

    python study.py                 # default sizes (StudyConfig), seeds 0, 1, 2, into runs/study
    python study.py --quick         # toy sizes, 2 seeds: the same pipeline in about two minutes (machinery, not accuracy)
    python study.py --seeds 5       # students trained with seeds 0..4 (the teacher is trained once)
    python study.py --jobs 1        # one worker process instead of one per core (the same results)
    python study.py --force         # redo every stage instead of reusing finished ones
    python study.py --config recipes/study_qwen2.5-0.5b_gsm8k.toml [--preview]
                                    # the grid on real checkpoints, as a config names it (trainer/grid.py);
                                    # --preview: its cost preview only, no stage runs

Stages (each writes its directory and is skipped once its DONE marker exists; a killed training stage
resumes from its last checkpoint with train.py --resume):

    data        data/synthetic.py: train / test / harder splits (harder: 4-5 reasoning steps where
                training has 1-3), and a byte-level BPE tokenizer (tokenizer.json) trained on the train split
    teacher     preset tiny-teacher, SFT on the train split, trained once (seed 0) and shared by every
                seed, as in the paper (one teacher)                             train.py --stage sft
    base        preset tiny-student, SFT on demonstrations of which a share stops one step early (more often
                for longer problems): our stand-in for an "Instruct" checkpoint, which solves a fair share
                greedily and more with samples (pass@k well above pass@1); every student variant starts from it
    sft         more SFT on the train labels                                     train.py --stage sft
    seq_kd      sequence-level KD (Kim & Rush 2016): the teacher samples solutions to train questions,
                only the correct ones are kept (train.py --stage gen), then SFT on them
    kd_forward  logit KD: alpha * CE + (1 - alpha) * KL(p_teacher || q_student)  train.py --stage kd
    kd_reverse  logit KD with the reverse KL(q_student || p_teacher) (MiniLLM, Gu et al. 2024)
    grpo, sft_grpo, kd_grpo
                GRPO from base / sft / kd_forward on the train questions         train.py --stage rl
    eval        eval.evaluate of each final model on test and harder: greedy pass@1, and pass@k from k
                samples at a temperature
    curve       greedy pass@1 on test of each intermediate checkpoint (every 1/curve_points of the budget)
    report      results.json, results.md (mean and per-seed tables, paired differences with 95% intervals
                and verdicts, machine, commit, wall time), results.png, curves.png (accuracy vs steps and
                vs training seconds, band = range over seeds), rl_curve.png (GRPO rollout accuracy and
                share of zero-variance groups per step)

Seeds: a seed sets a student's init, data order and sampling (seq_kd's traces, GRPO's rollouts, the
sampled eval); the data, the tokenizer and the teacher are the same for every seed. Every comparison
the report states is a paired difference over seeds x problems with a bootstrap 95% interval
(data/stats.py), a finding only when the interval excludes 0.

Schedule: the stages form a graph (a stage needs the stages whose outputs it reads); `--jobs` worker
processes of one torch thread each run every stage as soon as its needs are done. A stage's result is
a function of its inputs and seeds only, so the schedule does not change it (tested: bit-identical
weights with --jobs 1 and --jobs 2).

Equal budgets: sft, seq_kd, kd_forward and kd_reverse each take `variant_steps` optimizer steps of
`batch_size` sequences from base; their compute differs (logit KD adds a teacher forward per step,
seq_kd the teacher's sampling), which the training-time column shows. The three GRPO runs take the
same `grpo_steps` rollout batches, so sft_grpo vs sft and kd_grpo vs kd_forward show what GRPO adds.
"""
from __future__ import annotations

import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.readers import load_gsm8k
from data.stats import paired_difference, verdict
from data.synthetic import corpus_texts, write_jsonl, write_splits
from model.config import PRESETS
from model.generate import SamplingParams
from model.tokenizer import load_tokenizer, train_tokenizer
from trainer import cli
from trainer.checkpoint import checkpoint_paths
from trainer.grid import run_grid
from trainer.evaluation import evaluate, load_model
from trainer.metrics import read_metrics
from trainer.report import cell, metric, plot_results, provenance, pyplot, stage_seconds, table
from trainer.stages import (Stage, check_config, default_jobs, device, eval_modes, evaluate_model, run_stages,
                            run_train)

SPLITS = ("test", "harder")
SHARED = ("teacher",)  # trained once, with seed 0, and used by every seed


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study. Steps are optimizer steps of `batch_size` sequences. The runs behind these
    sizes, and what they showed, are logged in docs/study/experiments.md."""
    teacher: str = "tiny-teacher"  # model presets
    student: str = "tiny-student"
    n_train: int = 16_000  # 1.2 epochs of the teacher's steps
    n_test: int = 200
    n_harder: int = 100
    vocab_size: int = 1000  # upper bound for the tokenizer (the default corpus yields ~650 pieces)
    batch_size: int = 32
    max_len: int = 160  # tokens per training sequence (the longest train row is 153)
    lr: float = 3e-3  # base (from random init)
    variant_lr: float = 1e-3  # every variant but GRPO (fine-tuning a trained model)
    teacher_lr: float = 1.5e-3  # half the student's: twice its width
    warmup_steps: int = 30
    teacher_steps: int = 600
    base_steps: int = 600  # the arithmetic is learned (the "Instruct" stand-in)
    variant_steps: int = 150  # every variant's budget from base
    kd_alpha: float = 0.5  # logit KD: alpha * CE + (1 - alpha) * KL
    grpo_steps: int = 20  # GRPO: rollout batches (one optimizer step each) ...
    grpo_prompts: int = 8  # ... of this many train questions ...
    grpo_group: int = 16  # ... times this many samples (the group of the baseline)
    grpo_lr: float = 1e-4  # constant after 5 warmup steps
    gen_questions: int = 1600  # train questions the teacher answers for seq_kd ...
    gen_samples: int = 2  # ... samples each ...
    gen_temperature: float = 0.7  # ... at this temperature
    only_correct: bool = True  # seq_kd keeps only traces graded correct
    max_new_tokens: int = 176  # eval, gen and GRPO; the longest harder solution is 152 tokens
    pass_k: int = 4  # sampled eval: k samples per problem, pass@k
    temperature: float = 0.8  # sampled eval
    eval_batch: int = 100  # prompts generated together
    curve_points: int = 4  # learning curves: a checkpoint every 1/curve_points of each budget, greedy on test
    # The "Instruct" stand-in's selectable wrong behaviour: base's demonstration of an n-step problem stops
    # one step early with probability n * instruct_skip (instruct_demonstrations; 0: the clean train split)
    instruct_skip: float = 0.25


# Toy sizes: every stage runs, nothing is learned. The toy teacher is the student preset, trained
# long enough on a few rows to end its answers (seq_kd drops unfinished traces), and keeps wrong
# traces, which an untrained model writes.
QUICK = StudyConfig(teacher="tiny-student", n_train=32, n_test=4, n_harder=2, batch_size=8, max_len=160,
                    teacher_lr=3e-3, warmup_steps=2, teacher_steps=40, base_steps=2, variant_steps=2, grpo_steps=2,
                    grpo_prompts=2, grpo_group=2, gen_questions=8,
                    gen_samples=2, only_correct=False, max_new_tokens=160, pass_k=2, eval_batch=8)


@dataclass(frozen=True)
class Run:
    """One seed's study in study directory `out`: seed_<seed>/<stage>/, and the shared teacher's
    <out>/teacher/, <out>/eval/teacher/, <out>/curve/teacher/ (trained and evaluated with seed 0)."""
    cfg: StudyConfig
    seed: int
    out: Path

    @property
    def data(self) -> Path:  # splits and tokenizer (shared by all seeds)
        return self.out / "data"

    def home(self, name: str) -> Path:
        return self.out if name in SHARED else self.out / f"seed_{self.seed}"

    def dir(self, name: str) -> Path:
        return self.home(name) / name

    def final(self, name: str) -> str:
        return str(self.dir(name) / "final")

    def eval_dir(self, name: str) -> Path:
        return self.home(name) / "eval" / name

    def curve_dir(self, name: str) -> Path:
        return self.home(name) / "curve" / name


@dataclass(frozen=True)
class Method:
    name: str
    what: str  # one line for results.md
    start: str | None  # the method whose final model it starts from (None: random init)
    steps: Callable[[StudyConfig], int]  # its training budget: optimizer steps ...
    per_step: Callable[[StudyConfig], str]  # ... of what
    plan: Callable[[Run, "Method"], list[Stage]]  # its training stages, in order


# ------------------------------------------------------------------ stages

def skip_last_step(answer: str) -> str:
    """A solution that stops one step early: the last reasoning line is dropped and the count before it
    is given as the answer (a 1-step solution becomes "#### <the starting count>")."""
    *steps, _ = answer.split("\n")
    before = re.search(r" has (\d+)[+-]\d+ = ", steps[-1])
    if before is None:
        raise ValueError(f"not a synthetic solution line: {steps[-1]!r}")
    return "\n".join([*steps[:-1], f"#### {before.group(1)}"])


def instruct_demonstrations(rows: list[dict], skip_per_step: float, seed: int = 0) -> list[dict]:
    """The rows with the solution of an n-step problem stopping one step early (skip_last_step) with
    probability min(1, n * skip_per_step), drawn from a generator seeded by `seed`: longer problems are
    cut short more often."""
    rng = random.Random(seed)
    return [{**row, "answer": skip_last_step(row["answer"])} if rng.random() < min(1.0, row["steps"] * skip_per_step)
            else row for row in rows]


def prepare_data(cfg: StudyConfig, out: Path):
    """Splits, the seq_kd question subset, base's demonstrations (when corrupted) and the tokenizer
    trained on the train split."""
    paths = write_splits(out, seed=0, n_train=cfg.n_train, n_test=cfg.n_test, n_harder=cfg.n_harder, n_code=1)
    train_rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    write_jsonl(out / "questions.jsonl", train_rows[:cfg.gen_questions])
    if cfg.instruct_skip:
        write_jsonl(out / "base_train.jsonl", instruct_demonstrations(train_rows, cfg.instruct_skip))
    train_tokenizer(corpus_texts(train_rows), out / "tokenizer", cfg.vocab_size)


def train_args(run: Run, stage_name: str, model: str, data: str, steps: int | None,
               settings: dict | None = None) -> list[str]:
    """train.py arguments of a study stage: `steps` for training stages (None: stage gen), and
    `settings` ({config key: value}) over the study's common ones. Training stages keep a checkpoint
    every 1/curve_points of their steps (the learning curve's points)."""
    cfg = run.cfg
    sets = {"seed": run.seed, "data.micro_batch_size": cfg.batch_size, "data.max_len": cfg.max_len,
            "data.style": "chat", "data.task": "synthetic"}
    if steps is not None:
        sets.update({"optim.lr": cfg.lr, "optim.warmup_steps": min(cfg.warmup_steps, steps),
                     "log_every": max(1, steps // 20), "save_every": max(1, steps // cfg.curve_points),
                     "keep_last": cfg.curve_points})
    sets.update(settings or {})
    return ["--model", model, "--tokenizer", str(run.data / "tokenizer"), "--data", data,
            "--out", str(run.dir(stage_name)), *(["--max-steps", str(steps)] if steps else []),
            *[f"--set={k}={v}" for k, v in sets.items()]]


def preset(cfg: StudyConfig, method: Method) -> str:
    """The model preset a method's weights have: the teacher's, or the student's for every other."""
    return cfg.teacher if method.name == "teacher" else cfg.student


def start_model(run: Run, method: Method) -> str:
    """The final model of method.start, or the preset (random init) for teacher and base."""
    return run.final(method.start) if method.start else preset(run.cfg, method)


def method_args(run: Run, method: Method, data: str, settings: dict | None = None) -> list[str]:
    """train_args of a method's training stage; a method that starts from a trained model trains at variant_lr."""
    lr = {"optim.lr": run.cfg.variant_lr} if method.start else {}
    return train_args(run, method.name, start_model(run, method), data, method.steps(run.cfg), {**lr, **(settings or {})})


def training(run: Run, method: Method, stage_name: str, args: list[str], *needs: Path) -> Stage:
    """The stage that trains `method` with train.py's `stage_name`; it needs the data, its start and `needs`."""
    start = (run.dir(method.start),) if method.start else ()
    return Stage(run.dir(method.name), (run_train, (stage_name, args)), (run.data, *start, *needs))


def plan_sft(run: Run, method: Method) -> list[Stage]:
    """SFT on the train split's reference solutions (base: on base_train.jsonl when corrupted)."""
    settings = {"optim.lr": run.cfg.teacher_lr} if method.name == "teacher" else None
    data = "base_train.jsonl" if method.name == "base" and run.cfg.instruct_skip else "train.jsonl"
    return [training(run, method, "sft", method_args(run, method, str(run.data / data), settings))]


def plan_seq_kd(run: Run, method: Method) -> list[Stage]:
    """The teacher's sampled traces (<name>_traces/traces.jsonl), then SFT on them as prompt/completion."""
    cfg, traces = run.cfg, run.dir(f"{method.name}_traces")
    gen = train_args(run, traces.name, run.final("teacher"), str(run.data / "questions.jsonl"), None, {
        "gen.n": cfg.gen_samples, "gen.temperature": cfg.gen_temperature, "gen.max_new_tokens": cfg.max_new_tokens,
        "gen.only_correct": str(cfg.only_correct).lower(), "gen.batch_size": cfg.eval_batch})
    sft = method_args(run, method, str(traces / "traces.jsonl"), {"data.format": "prompt_completion"})
    return [Stage(traces, (run_train, ("gen", gen)), (run.data, run.dir("teacher"))),
            training(run, method, "sft", sft, traces)]


def plan_kd(run: Run, method: Method) -> list[Stage]:
    """Logit KD from the teacher; the divergence is the method name's suffix (forward / reverse KL)."""
    loss = {"kd_forward": "forward_kl", "kd_reverse": "reverse_kl"}[method.name]
    kd = ["--teacher", run.final("teacher"),
          *method_args(run, method, str(run.data / "train.jsonl"), {"kd.loss": loss, "kd.alpha": run.cfg.kd_alpha})]
    return [training(run, method, "kd", kd, run.dir("teacher"))]


def plan_grpo(run: Run, method: Method) -> list[Stage]:
    """GRPO on the train questions, reward = the gsm8k grader's correctness (recipes/rl_tiny.toml's
    algorithm: DAPO token-level loss, group std scaling, no KL reference, one update per rollout batch)."""
    cfg = run.cfg
    rl = method_args(run, method, str(run.data / "train.jsonl"), {
        "optim.lr": cfg.grpo_lr, "optim.min_lr_ratio": 1.0, "optim.warmup_steps": min(5, cfg.grpo_steps),
        "grpo.prompts_per_step": cfg.grpo_prompts, "grpo.group_size": cfg.grpo_group,
        "grpo.max_new_tokens": cfg.max_new_tokens, "grpo.seed": run.seed, "log_every": 1})
    return [training(run, method, "rl", rl)]


def sequences(c: StudyConfig) -> str:
    return f"{c.batch_size} sequences"


def rollouts(c: StudyConfig) -> str:
    return f"{c.grpo_prompts} prompts x {c.grpo_group} samples"


# In training order: a method's start comes before it.
METHODS = (
    Method("teacher", "the teacher preset, SFT on the train split (one teacher, seed 0, for every seed)", None,
           lambda c: c.teacher_steps, sequences, plan_sft),
    Method("base", "the student preset, SFT on demonstrations that often stop one step early (the 'Instruct' "
           "stand-in)", None,
           lambda c: c.base_steps, sequences, plan_sft),
    Method("sft", "base + more SFT on the train labels", "base", lambda c: c.variant_steps, sequences, plan_sft),
    Method("seq_kd", "base + SFT on the teacher's sampled traces (sequence-level KD)", "base",
           lambda c: c.variant_steps, sequences, plan_seq_kd),
    Method("kd_forward", "base + logit KD, alpha*CE + (1-alpha)*KL(teacher||student)", "base",
           lambda c: c.variant_steps, sequences, plan_kd),
    Method("kd_reverse", "base + logit KD, alpha*CE + (1-alpha)*KL(student||teacher)", "base",
           lambda c: c.variant_steps, sequences, plan_kd),
    Method("grpo", "base + GRPO on the train questions (reward: the answer is correct)", "base",
           lambda c: c.grpo_steps, rollouts, plan_grpo),
    Method("sft_grpo", "sft + the same GRPO", "sft", lambda c: c.grpo_steps, rollouts, plan_grpo),
    Method("kd_grpo", "kd_forward + the same GRPO", "kd_forward", lambda c: c.grpo_steps, rollouts, plan_grpo),
)
BY_NAME = {m.name: m for m in METHODS}
RL_METHODS = ("grpo", "sft_grpo", "kd_grpo")
# The comparisons the report states, as A - B: KD vs SFT, forward vs reverse KL, each GRPO run vs its
# start, the hybrids vs their GRPO part, and more SFT vs base.
COMPARISONS = (("sft", "base"), ("seq_kd", "sft"), ("kd_forward", "sft"), ("kd_reverse", "sft"),
               ("kd_forward", "kd_reverse"), ("grpo", "base"), ("sft_grpo", "sft"), ("kd_grpo", "kd_forward"),
               ("sft_grpo", "grpo"), ("kd_grpo", "grpo"))


def method_run(run: Run, name: str) -> Run:
    """The run a method is trained in: the shared teacher's is seed 0's."""
    return replace(run, seed=0) if name in SHARED else run


def plan(cfg: StudyConfig, out: Path, seeds: int) -> list[Stage]:
    """Every stage of the study, each once (the shared teacher's too), seed by seed in METHODS order."""
    stages = {out / "data": Stage(out / "data", (prepare_data, (cfg, out / "data")))}
    for seed in range(seeds):
        for method in METHODS:
            run = method_run(Run(cfg, seed, out), method.name)
            trained = run.dir(method.name)
            for s in (*method.plan(run, method),
                      Stage(run.eval_dir(method.name), (evaluate_final, (run, method.name)), (trained,)),
                      Stage(run.curve_dir(method.name), (evaluate_checkpoints, (run, method.name)), (trained,))):
                stages.setdefault(s.path, s)
    return list(stages.values())


# ------------------------------------------------------------------ evaluation

def eval_params(run: Run) -> dict[str, SamplingParams]:
    """Greedy (pass@1) and `pass_k` samples per problem at `temperature` (pass@k)."""
    cfg = run.cfg
    return eval_modes(cfg.max_new_tokens, cfg.pass_k, cfg.temperature, run.seed)


def evaluate_final(run: Run, name: str):
    """A method's final model on every split and mode, into <eval dir>/<split>_<mode>/."""
    suites = {split: ("synthetic", load_gsm8k(run.data / f"{split}.jsonl")) for split in SPLITS}
    evaluate_model(run.final(name), str(run.data / "tokenizer"), suites, eval_params(run), "chat", run.cfg.eval_batch,
                   run.eval_dir(name))


def evaluate_checkpoints(run: Run, name: str):
    """Greedy pass@1 on test of each training checkpoint but the last (that one is final/, evaluated by
    evaluate_final), into <curve dir>/step_<step>/."""
    model, tokenizer = load_model(run.final(name), str(run.data / "tokenizer"), device())
    rows = load_gsm8k(run.data / "test.jsonl")
    run.curve_dir(name).mkdir(parents=True, exist_ok=True)
    for path in checkpoint_paths(run.dir(name))[:-1]:
        model.load_state_dict(torch.load(path, map_location=device(), weights_only=True)["model"])
        evaluate(model, tokenizer, rows, "synthetic", eval_params(run)["greedy"], "chat", run.cfg.eval_batch,
                 out_dir=run.curve_dir(name) / path.stem, progress=False)


def eval_results(run: Run, name: str) -> dict:
    """{split: {mode: eval summary}} of a method's final model."""
    return {split: {mode: json.loads((run.eval_dir(name) / f"{split}_{mode}" / "summary.json").read_text())
                    for mode in eval_params(run)} for split in SPLITS}


def greedy_scores(run: Run, name: str, split: str) -> tuple[list[str], list[float]]:
    """(problem ids, greedy scores) of a method's final model on a split, in the split's order."""
    lines = (run.eval_dir(name) / f"{split}_greedy" / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [str(r["id"]) for r in records], [float(r["score"]) for r in records]


def train_seconds(run: Run, method: Method) -> float | None:
    """The seconds its training stages stored (seq_kd: the teacher's sampling too); None if one has none."""
    files = [s.path / "seconds.txt" for s in method.plan(run, method)]
    return round(sum(float(f.read_text()) for f in files), 1) if all(f.exists() for f in files) else None


def seed_results(cfg: StudyConfig, out: Path, seed: int) -> dict:
    """{method: {"train_seconds", "eval"}} of one seed (the shared teacher's: seed 0's)."""
    results = {}
    for method in METHODS:
        run = method_run(Run(cfg, seed, out), method.name)
        results[method.name] = {"train_seconds": train_seconds(run, method), "eval": eval_results(run, method.name)}
    return results


def elapsed(run_dir: Path, step: int) -> float | None:
    """Training seconds at `step`: elapsed_s of the last metrics record at or before it (seconds since the
    stage's last (re)start: a resumed stage counts from its resume)."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= step]
    return round(records[-1]["elapsed_s"], 1) if records else None


def curve(run: Run, method: Method) -> list[dict]:
    """Greedy test pass@1 along the method's budget: {step, seconds, accuracy} at step 0 (its start's final
    model; none for random init), at each intermediate checkpoint and at the end."""
    test = lambda name: eval_results(run, name)["test"]["greedy"]["pass@1"]  # noqa: E731
    points = [{"step": 0, "seconds": 0.0, "accuracy": test(method.start)}] if method.start else []
    for path in sorted(run.curve_dir(method.name).glob("step_*")):
        step = int(path.name.split("_")[1])
        accuracy = json.loads((path / "summary.json").read_text())["pass@1"]
        points.append({"step": step, "seconds": elapsed(run.dir(method.name), step), "accuracy": accuracy})
    steps = method.steps(run.cfg)
    return points + [{"step": steps, "seconds": elapsed(run.dir(method.name), steps), "accuracy": test(method.name)}]


def curves(cfg: StudyConfig, out: Path, seeds: int) -> dict:
    """{method: [one curve per seed]} (the shared teacher: one curve)."""
    return {m.name: [curve(method_run(Run(cfg, seed, out), m.name), m)
                     for seed in range(1 if m.name in SHARED else seeds)] for m in METHODS}


def comparisons(cfg: StudyConfig, out: Path, seeds: int) -> list[dict]:
    """Every COMPARISONS pair on every split: the paired difference of greedy pass@1 over seeds x problems
    with its bootstrap 95% interval and verdict (data/stats.py)."""
    rows = []
    for a, b in COMPARISONS:
        for split in SPLITS:
            ids, scores = {}, {a: [], b: []}
            for seed in range(seeds):
                for name in (a, b):
                    problem_ids, values = greedy_scores(method_run(Run(cfg, seed, out), name), name, split)
                    if ids.setdefault(split, problem_ids) != problem_ids:
                        raise ValueError(f"{name} (seed {seed}) was evaluated on other {split} problems than {a}")
                    scores[name].append(values)
            p = paired_difference(np.array(scores[a]), np.array(scores[b]))
            rows.append({"a": a, "b": b, "split": split, "delta": p.delta, "ci95": [p.low, p.high],
                         "seeds": p.seeds, "problems": p.problems, "detected": p.detected,
                         "verdict": verdict(a, b, p)})
    return rows


def rl_summary(cfg: StudyConfig, out: Path, seeds: int) -> dict:
    """Per GRPO method, mean over seeds: rollout accuracy (the mean correctness reward of a step's samples)
    over the first and the last `window` steps, and the share of groups whose rewards are all equal
    (zero variance: no learning signal) over the same steps and over the whole run."""
    window = max(1, cfg.grpo_steps // 8)
    summary = {}
    for name in RL_METHODS:
        runs = [read_metrics(Run(cfg, seed, out).dir(name) / "metrics.jsonl") for seed in range(seeds)]
        mean = lambda key, part: statistics.fmean(statistics.fmean(r[key] for r in part(run)) for run in runs)  # noqa: E731
        first, last, whole = (lambda run: run[:window]), (lambda run: run[-window:]), (lambda run: run)
        summary[name] = {"window": window, "accuracy_first": mean("accuracy", first),
                         "accuracy_last": mean("accuracy", last), "zero_std_first": mean("zero_std_frac", first),
                         "zero_std_last": mean("zero_std_frac", last), "zero_std_all": mean("zero_std_frac", whole)}
    return summary


# ------------------------------------------------------------------ report

def aggregate(cfg: StudyConfig, per_seed: list[dict], vocab_size: int) -> dict:
    """results.json's "methods": every method x split, mean over seeds (the shared teacher: its one run)."""
    k = f"pass@{cfg.pass_k}"
    methods = {}
    for method in METHODS:
        model = preset(cfg, method)
        entry = {"what": method.what, "start": method.start or f"random init ({model})",
                 "budget": f"{method.steps(cfg)} steps x {method.per_step(cfg)}",
                 "params": replace(PRESETS[model], vocab_size=vocab_size).num_parameters}
        runs = [seed[method.name] for seed in (per_seed[:1] if method.name in SHARED else per_seed)]
        seconds = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        splits = {}
        for split in SPLITS:
            problems = runs[0]["eval"][split]["greedy"]["problems"]
            splits[split] = {"problems": problems,
                             "greedy pass@1": metric([r["eval"][split]["greedy"]["pass@1"] for r in runs], problems),
                             f"sampled {k}": metric([r["eval"][split]["sampled"][k] for r in runs], problems)}
        methods[method.name] = {**entry, "train_seconds": statistics.fmean(seconds) if seconds else None,
                                "splits": splits}
    return methods


def preamble(cfg: StudyConfig, seeds: int) -> list[str]:
    """What the table's figures are and every method's training budget."""
    return [
        f"Synthetic GSM8K-style task: {cfg.n_train} train rows (1-3 steps), test {cfg.n_test} (1-3 steps), "
        f"harder {cfg.n_harder} (4-5 steps). Accuracy in % over {seeds} seed(s) (the teacher: trained once, "
        f"seed 0): mean{' ± std across seeds' if seeds > 1 else ''} [95% Wilson interval of the attempts]. "
        f"Sampled: {cfg.pass_k} samples per problem at temperature {cfg.temperature}; "
        f"max {cfg.max_new_tokens} new tokens. Train s: the method's own stages (seq_kd includes the "
        f"teacher's sampling); variants also build on base's.", "",
        f"Budgets: the teacher trains {cfg.teacher_steps} optimizer steps of {cfg.batch_size} sequences at lr "
        f"{cfg.teacher_lr}, base {cfg.base_steps} at lr {cfg.lr}, and every variant {cfg.variant_steps} more "
        f"from base at lr {cfg.variant_lr} (cosine decay after {cfg.warmup_steps} warmup steps). seq_kd: the "
        f"teacher answers {cfg.gen_questions} train questions {cfg.gen_samples} times at temperature {cfg.gen_temperature} "
        f"({'correct traces only' if cfg.only_correct else 'every finished trace'}). Logit KD: "
        f"{cfg.kd_alpha} * CE + {1 - cfg.kd_alpha} * KL, temperature 1. GRPO: {cfg.grpo_steps} rollout batches "
        f"of {cfg.grpo_prompts} train questions x {cfg.grpo_group} samples at temperature 1, one optimizer "
        f"step each, lr {cfg.grpo_lr}."
        + (f" base's demonstration of an n-step problem stops one step early (the last reasoning line dropped, "
           f"the count before it given as the answer) with probability n x {cfg.instruct_skip}." if cfg.instruct_skip
           else "")]


def mean_table(cfg: StudyConfig, methods: dict) -> list[str]:
    columns = ("greedy pass@1", f"sampled pass@{cfg.pass_k}")
    head = ["method", "starts from", "budget", "params", "train s", *[f"{s} {c}" for s in SPLITS for c in columns]]
    return table(head, [[name, m["start"], m["budget"], f"{m['params'] / 1e6:.2f}M",
                         f"{m['train_seconds']:.0f}" if m["train_seconds"] is not None else "?",
                         *[cell(m["splits"][split][column]) for split in SPLITS for column in columns]]
                        for name, m in methods.items()])


def seed_table(methods: dict, seeds: int) -> list[str]:
    """Greedy pass@1 of every seed's model (the shared teacher: seed 0 only)."""
    head = ["method", *[f"{split} seed {seed}" for split in SPLITS for seed in range(seeds)]]
    rows = []
    for name, m in methods.items():
        values = {split: m["splits"][split]["greedy pass@1"]["per_seed"] for split in SPLITS}
        rows.append([name, *[f"{100 * values[split][seed]:.1f}" if seed < len(values[split]) else "(shared)"
                             for split in SPLITS for seed in range(seeds)]])
    return table(head, rows)


def paired_table(rows: list[dict]) -> list[str]:
    return table(["A - B", "split", "difference (points)", "95% interval", "verdict"],
                 [[f"{r['a']} - {r['b']}", r["split"], f"{100 * r['delta']:+.1f}",
                   f"[{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}]",
                   "**finding**" if r["detected"] else "no detectable difference"] for r in rows])


def grpo_table(rl: dict) -> list[str]:
    window = next(iter(rl.values()))["window"]
    head = ["GRPO run", f"rollout accuracy, first {window} steps", f"last {window} steps",
            f"zero-variance groups, first {window} steps", f"last {window} steps", "whole run"]
    return table(head, [[name, *[f"{100 * r[key]:.1f}" for key in ("accuracy_first", "accuracy_last", "zero_std_first",
                                                                  "zero_std_last", "zero_std_all")]]
                        for name, r in rl.items()])


def markdown(cfg: StudyConfig, methods: dict, paired: list[dict], rl: dict, seeds: int) -> str:
    lines = ["# Study results", "", *preamble(cfg, seeds), "", *mean_table(cfg, methods), "",
             "Greedy pass@1 per seed (%):", "", *seed_table(methods, seeds), "",
             f"GRPO rollouts (%, mean over {seeds} seed(s); samples at temperature 1):", "", *grpo_table(rl), "",
             f"Paired differences of greedy pass@1, A - B, over {seeds} seed(s) x the split's problems: 95% "
             "percentile-bootstrap interval, seeds and problems resampled i.i.d. with the same indices for A and "
             "B (data/stats.py). A finding only when the interval excludes 0.", "", *paired_table(paired), "",
             "Methods:", *[f"- {name}: {m['what']}" for name, m in methods.items()]]
    return "\n".join(lines) + "\n"


def band(ax, xs: list[float], runs: list[list[float]], label: str):
    """Mean over runs as a line, their range (min to max) as a shaded band."""
    values = np.array(runs, dtype=float)
    (line,) = ax.plot(xs, values.mean(axis=0), marker=".", label=label)
    if len(runs) > 1:
        ax.fill_between(xs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)


def plot_curves(all_curves: dict, path: Path) -> str:
    """Greedy test pass@1 vs optimizer steps and vs training seconds (mean over seeds, band: their range)."""
    plt = pyplot()
    if plt is None:
        return f"{path.name}: skipped, matplotlib is not installed"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in all_curves.items():
        accuracy = [[100 * p["accuracy"] for p in run] for run in runs]
        band(axes[0], [p["step"] for p in runs[0]], accuracy, name)
        seconds = [statistics.fmean(run[i]["seconds"] or 0.0 for run in runs) for i in range(len(runs[0]))]
        band(axes[1], seconds, accuracy, name)
    for ax, x in zip(axes, ("optimizer steps of the method's own budget", "the method's own training seconds")):
        ax.set_xlabel(x)
        ax.set_ylabel("greedy test pass@1 (%)")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{path.name}: written"


def plot_rl_curve(cfg: StudyConfig, out: Path, seeds: int, path: Path) -> str:
    """Per GRPO step: rollout accuracy (mean correctness reward of the step's samples) and zero_std_frac
    (the share of groups whose rewards are all equal: no gradient), mean over seeds, band: their range."""
    plt = pyplot()
    if plt is None:
        return f"{path.name}: skipped, matplotlib is not installed"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in RL_METHODS:
        runs = [read_metrics(Run(cfg, seed, out).dir(name) / "metrics.jsonl") for seed in range(seeds)]
        steps = [r["step"] for r in runs[0]]
        for ax, key in zip(axes, ("accuracy", "zero_std_frac")):
            band(ax, steps, [[100 * r.get(key, math.nan) for r in run] for run in runs], name)
    for ax, label in zip(axes, ("rollout accuracy (%)", "groups with zero reward variance (%)")):
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{path.name}: written"


def headline(methods: dict, paired: list[dict]) -> str:
    """The targets' figures (teacher, best student relative to it) and the test split's findings."""
    def test(name):
        return methods[name]["splits"]["test"]["greedy pass@1"]["mean"]
    best = max((name for name in methods if name != "teacher"), key=test)
    ratio = f"{test(best) / test('teacher'):.0%}" if test("teacher") > 0 else "n/a"
    on_test = [r for r in paired if r["split"] == "test"]
    findings = "; ".join(r["verdict"] for r in on_test if r["detected"]) or "none"
    none = ", ".join(f"{r['a']} vs {r['b']}" for r in on_test if not r["detected"]) or "none"
    return (f"Teacher test pass@1 {test('teacher'):.1%}. Best student (mean): {best}, {test(best):.1%} = {ratio} of "
            f"the teacher with {methods[best]['params'] / methods['teacher']['params']:.2f}x its parameters.\n\n"
            f"Findings on test (greedy pass@1, 95% interval excludes 0): {findings}.\n\n"
            f"No detectable difference on test: {none}.")


def write_report(out: Path, cfg: StudyConfig, methods: dict, paired: list[dict], all_curves: dict, seeds: int,
                 footer: list[str]):
    total = stage_seconds(out)
    rl = rl_summary(cfg, out, seeds)
    results = {"config": asdict(cfg), "seeds": seeds, "stage_seconds": total, "methods": methods,
               "comparisons": paired, "grpo": rl, "curves": all_curves}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (markdown(cfg, methods, paired, rl, seeds) + "\n" + headline(methods, paired) + "\n\n"
            f"All stages (data, training, generation, evaluation; {seeds} seed(s)): {total:.0f} s of stage time.\n\n"
            + "\n".join(footer) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    print(plot_results({name: {split: m["splits"][split]["greedy pass@1"] for split in SPLITS}
                        for name, m in methods.items()}, out / "results.png"))
    print(plot_curves(all_curves, out / "curves.png"))
    print(plot_rl_curve(cfg, out, seeds, out / "rl_curve.png"))


# ------------------------------------------------------------------ main

def parse_args(argv):
    p = cli.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="study directory (stages are cached in it; default runs/study)")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the machinery in about two minutes")
    p.add_argument("--seeds", type=int, default=None,
                   help="train the students with seeds 0..N-1 (default 3; 2 with --quick); report paired differences")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes of one torch thread each (default: one per core); results do not depend on it")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--config", help="a study grid config (trainer/grid_config.py) instead of the embedded study")
    p.add_argument("--preview", action="store_true", help="with --config: print and write the cost preview only")
    args = p.parse_args(argv)
    if args.config is not None:
        given = [flag for flag, named in (("--out", args.out is not None), ("--quick", args.quick),
                                          ("--seeds", args.seeds is not None), ("--jobs", args.jobs is not None)) if named]
        if given:
            raise ValueError(f"{given[0]} applies to the embedded study; a --config names its own (out, seeds, "
                             f"launch.jobs)")
        return args
    if args.preview:
        raise ValueError("--preview needs --config (the embedded study has no cost preview)")
    args.out = args.out or "runs/study"
    args.jobs = default_jobs() if args.jobs is None else args.jobs
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv=None) -> int:
    """0 when the report is written, 2 with a one-line error otherwise (trainer/cli.py)."""
    return cli.run(run_study, argv)


def run_study(argv):
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.config is not None:
        run_grid(args.config, args.preview, args.force)
        return
    cfg = QUICK if args.quick else StudyConfig()
    out = Path(args.out)
    check_config(out, asdict(cfg), args.force)
    run_stages(plan(cfg, out, args.seeds), args.jobs, args.force)
    per_seed = [seed_results(cfg, out, seed) for seed in range(args.seeds)]
    vocab_size = load_tokenizer(out / "data" / "tokenizer").vocab_size
    write_report(out, cfg, aggregate(cfg, per_seed, vocab_size), comparisons(cfg, out, args.seeds),
                 curves(cfg, out, args.seeds), args.seeds, provenance(args.jobs, time.perf_counter() - t0))


if __name__ == "__main__":
    sys.exit(main())
