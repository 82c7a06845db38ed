"""The study in miniature: a teacher, a base student and student variants on the synthetic task, on CPU.

    python study.py                 # default sizes (StudyConfig), into runs/study
    python study.py --quick         # toy sizes: the same pipeline in about two minutes (machinery, not accuracy)
    python study.py --seeds 3       # every model trained with seeds 0, 1, 2; the tables give mean ± std
    python study.py --force         # redo every stage instead of reusing finished ones

Stages, top to bottom (each writes <out>/.../<stage>/ and is skipped once its DONE marker exists;
a killed training stage resumes from its last checkpoint with train.py --resume):

    data        data/synthetic.py: train / test / harder splits (harder: 4-5 reasoning steps where
                training has 1-3), and a sentencepiece tokenizer trained on the train split
    teacher     preset tiny-teacher, SFT on the train split                      train.py --stage sft
    base        preset tiny-student, a short SFT: it follows the answer format but reasons poorly,
                our stand-in for an "Instruct" checkpoint; every student variant starts from it
    sft         more SFT on the train labels                                     train.py --stage sft
    seq_kd      sequence-level KD (Kim & Rush 2016): the teacher samples solutions to train questions,
                only the correct ones are kept (train.py --stage gen), then SFT on them
    kd_forward  logit KD: alpha * CE + (1 - alpha) * KL(p_teacher || q_student)  train.py --stage kd
    kd_reverse  logit KD with the reverse KL(q_student || p_teacher) (MiniLLM, Gu et al. 2024)
    grpo, sft_grpo, kd_grpo
                GRPO from base / sft / kd_forward on the train questions         train.py --stage rl
    eval        eval.evaluate on test and harder: greedy pass@1, and pass@k from k samples at a temperature
    report      results.json, results.md, results.png (accuracy per method and split), rl_curve.png
                (GRPO rollout accuracy per step), and the table printed

Equal budgets: sft, seq_kd, kd_forward and kd_reverse each take `variant_steps` optimizer steps of
`batch_size` sequences from base; their compute differs (logit KD adds a teacher forward per step,
seq_kd the teacher's sampling), which the training-time column shows. The three GRPO runs take the
same `grpo_steps` rollout batches, so sft_grpo vs sft and kd_grpo vs kd_forward show what GRPO adds.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import train
from data.readers import load_gsm8k
from data.synthetic import corpus_texts, write_jsonl, write_splits
from model.config import PRESETS
from model.generate import SamplingParams
from model.tokenizer import load_tokenizer, train_tokenizer
from trainer import cli
from trainer.checkpoint import checkpoint_paths
from trainer.evaluation import evaluate, load_model
from trainer.metrics import read_metrics

SPLITS = ("test", "harder")
Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study. Steps are optimizer steps of `batch_size` sequences.

    Default sizes, from scratch runs on this task (chat style, this tokenizer, lr 3e-3 with cosine
    decay, greedy accuracy on 100 test problems): the tiny-student is at 12% / 24% / 69% / 88% after
    150 / 300 / 450 / 600 steps of a 600-step schedule (26% after a 300-step one): accuracy jumps
    once the model has learned the arithmetic, between ~300 and ~500 steps. So base gets 200 steps
    (the format, not yet the arithmetic) and every variant 300 more, which puts plain SFT inside
    the jump, where better training signals can show. GRPO at lr 1e-4 or 3e-4 lowered the greedy
    accuracy of a 26% student within 30 steps (to 19% / 9%) and left an 88% one within noise (85-90%);
    3e-5 did not hurt (89-91%), hence grpo_lr. The teacher (tiny-teacher, 5.5x the student's
    parameters) learns slower per step: 2% after 100 steps, and 56.5% after 500 steps at the
    student's lr 3e-3 (a first run of this study); hence 600 steps at half the lr (Adam's update of
    a wider layer moves its output more per step; large-model recipes also lower lr with width).
    """
    teacher: str = "tiny-teacher"  # model presets
    student: str = "tiny-student"
    n_train: int = 16_000  # 1.2 epochs of the teacher's steps
    n_test: int = 200
    n_harder: int = 100
    vocab_size: int = 1000  # upper bound for the tokenizer (the default corpus yields ~650 pieces)
    batch_size: int = 32
    max_len: int = 160  # tokens per training sequence (the longest train row is 153)
    lr: float = 3e-3  # every student stage but GRPO
    teacher_lr: float = 1.5e-3  # half the student's: twice its width
    warmup_steps: int = 30
    teacher_steps: int = 600
    base_steps: int = 200  # short: the format, not yet the arithmetic
    variant_steps: int = 300  # every variant's budget from base
    kd_alpha: float = 0.5  # logit KD: alpha * CE + (1 - alpha) * KL
    grpo_steps: int = 40  # GRPO: rollout batches (one optimizer step each) ...
    grpo_prompts: int = 8  # ... of this many train questions ...
    grpo_group: int = 8  # ... times this many samples (the group of the baseline)
    grpo_lr: float = 3e-5  # constant after 5 warmup steps
    gen_questions: int = 1600  # train questions the teacher answers for seq_kd ...
    gen_samples: int = 2  # ... samples each ...
    gen_temperature: float = 0.7  # ... at this temperature
    only_correct: bool = True  # seq_kd keeps only traces graded correct
    max_new_tokens: int = 176  # eval, gen and GRPO; the longest harder solution is 152 tokens
    pass_k: int = 4  # sampled eval: k samples per problem, pass@k
    temperature: float = 0.8  # sampled eval
    eval_batch: int = 100  # prompts generated together


# Toy sizes: every stage runs, nothing is learned. The toy teacher is the student preset, trained
# long enough on a few rows to end its answers (seq_kd drops unfinished traces), and keeps wrong
# traces, which an untrained model writes.
QUICK = StudyConfig(teacher="tiny-student", n_train=32, n_test=4, n_harder=2, batch_size=8, max_len=160,
                    teacher_lr=3e-3, warmup_steps=2, teacher_steps=40, base_steps=2, variant_steps=2, grpo_steps=2,
                    grpo_prompts=2, grpo_group=2, gen_questions=8,
                    gen_samples=2, only_correct=False, max_new_tokens=160, pass_k=2, eval_batch=8)


@dataclass(frozen=True)
class Run:
    """One seed's study. The seed sets model init, data order and sampling; the data and the
    tokenizer are the same for every seed (generated with seed 0), so seeds differ in training only."""
    cfg: StudyConfig
    seed: int
    data: Path  # <out>/data: splits and tokenizer (shared by all seeds)
    root: Path  # <out>/seed_<seed>
    force: bool

    def final(self, stage: str) -> str:
        return str(self.root / stage / "final")


@dataclass(frozen=True)
class Method:
    name: str
    what: str  # one line for results.md
    start: str | None  # the method whose final model it starts from (None: random init)
    steps: Callable[[StudyConfig], int]  # its training budget: optimizer steps ...
    per_step: Callable[[StudyConfig], str]  # ... of what
    train: Callable[[Run, "Method"], float]  # trains it (cached stages), returns seconds


# ------------------------------------------------------------------ stages

def stage(path: Path, force: bool, work: Callable[[], None]) -> float | None:
    """Run `work` unless path/DONE exists (then print a skip line); return its seconds.

    Training stages get DONE from train.py; other stages write it here after `work`. The seconds
    are stored in path/seconds.txt (a resumed stage counts its last invocation only).
    """
    if force and path.exists():
        shutil.rmtree(path)
    seconds_file = path / "seconds.txt"
    if (path / "DONE").exists():
        print(f"[study] skip {path} (done)")
        return float(seconds_file.read_text()) if seconds_file.exists() else None
    print(f"[study] run {path}")
    t0 = time.perf_counter()
    work()
    seconds = round(time.perf_counter() - t0, 1)  # as stored, so a re-run reports the same figure
    path.mkdir(parents=True, exist_ok=True)
    seconds_file.write_text(f"{seconds}\n")
    if not (path / "DONE").exists():
        (path / "DONE").write_text("done\n")
    return seconds


def prepare_data(cfg: StudyConfig, out: Path, force: bool):
    """Splits, the seq_kd question subset, and the tokenizer trained on the train split."""
    def work():
        paths = write_splits(out, seed=0, n_train=cfg.n_train, n_test=cfg.n_test, n_harder=cfg.n_harder, n_code=1)
        train_rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
        write_jsonl(out / "questions.jsonl", train_rows[:cfg.gen_questions])
        train_tokenizer(corpus_texts(train_rows), out / "tokenizer", cfg.vocab_size)
    stage(out, force, work)


def train_args(run: Run, stage_name: str, model: str, data: str, steps: int | None,
               settings: dict | None = None) -> list[str]:
    """train.py arguments of a study stage: `steps` for training stages (None: stage gen), and
    `settings` ({config key: value}) over the study's common ones."""
    cfg = run.cfg
    sets = {"seed": run.seed, "data.micro_batch_size": cfg.batch_size, "data.max_len": cfg.max_len,
            "data.style": "chat", "data.task": "synthetic"}
    if steps is not None:
        sets.update({"optim.lr": cfg.lr, "optim.warmup_steps": min(cfg.warmup_steps, steps),
                     "log_every": max(1, steps // 20), "save_every": max(1, steps // 4)})
    sets.update(settings or {})
    return ["--model", model, "--tokenizer", str(run.data / "tokenizer"), "--data", data,
            "--out", str(run.root / stage_name), *(["--max-steps", str(steps)] if steps else []),
            *[f"--set={k}={v}" for k, v in sets.items()]]


def run_train(stage_name: str, args: list[str]):
    """train.py's stage in-process (its errors propagate); resumes a run directory that holds checkpoints
    (a killed stage)."""
    out = Path(args[args.index("--out") + 1])
    resume = ["--resume"] if checkpoint_paths(out) else []
    train.execute(["--stage", stage_name, *args, *resume])


def preset(cfg: StudyConfig, method: Method) -> str:
    """The model preset a method's weights have: the teacher's, or the student's for every other."""
    return cfg.teacher if method.name == "teacher" else cfg.student


def start_model(run: Run, method: Method) -> str:
    """The final model of method.start, or the preset (random init) for teacher and base."""
    return run.final(method.start) if method.start else preset(run.cfg, method)


def method_args(run: Run, method: Method, data: str, settings: dict | None = None) -> list[str]:
    return train_args(run, method.name, start_model(run, method), data, method.steps(run.cfg), settings)


def train_sft(run: Run, method: Method) -> float:
    """SFT on the train split's reference solutions."""
    settings = {"optim.lr": run.cfg.teacher_lr} if method.name == "teacher" else None
    args = method_args(run, method, str(run.data / "train.jsonl"), settings)
    return stage(run.root / method.name, run.force, lambda: run_train("sft", args))


def train_seq_kd(run: Run, method: Method) -> float:
    """The teacher's sampled traces (<name>_traces/traces.jsonl), then SFT on them as prompt/completion."""
    cfg, traces = run.cfg, run.root / f"{method.name}_traces"
    gen = train_args(run, traces.name, run.final("teacher"), str(run.data / "questions.jsonl"), None, {
        "gen.n": cfg.gen_samples, "gen.temperature": cfg.gen_temperature, "gen.max_new_tokens": cfg.max_new_tokens,
        "gen.only_correct": str(cfg.only_correct).lower(), "gen.batch_size": cfg.eval_batch})
    gen_seconds = stage(traces, run.force, lambda: run_train("gen", gen))
    sft = method_args(run, method, str(traces / "traces.jsonl"), {"data.format": "prompt_completion"})
    return (gen_seconds or 0.0) + (stage(run.root / method.name, run.force, lambda: run_train("sft", sft)) or 0.0)


def train_kd(run: Run, method: Method) -> float:
    """Logit KD from the teacher; the divergence is the method name's suffix (forward / reverse KL)."""
    loss = {"kd_forward": "forward_kl", "kd_reverse": "reverse_kl"}[method.name]
    kd = ["--teacher", run.final("teacher"),
          *method_args(run, method, str(run.data / "train.jsonl"), {"kd.loss": loss, "kd.alpha": run.cfg.kd_alpha})]
    return stage(run.root / method.name, run.force, lambda: run_train("kd", kd))


def train_grpo(run: Run, method: Method) -> float:
    """GRPO on the train questions, reward = the gsm8k grader's correctness (recipes/rl_tiny.toml's
    algorithm: DAPO token-level loss, group std scaling, no KL reference, one update per rollout batch)."""
    cfg = run.cfg
    rl = method_args(run, method, str(run.data / "train.jsonl"), {
        "optim.lr": cfg.grpo_lr, "optim.min_lr_ratio": 1.0, "optim.warmup_steps": min(5, cfg.grpo_steps),
        "grpo.prompts_per_step": cfg.grpo_prompts, "grpo.group_size": cfg.grpo_group,
        "grpo.max_new_tokens": cfg.max_new_tokens, "grpo.seed": run.seed})
    return stage(run.root / method.name, run.force, lambda: run_train("rl", rl))


def sequences(c: StudyConfig) -> str:
    return f"{c.batch_size} sequences"


def rollouts(c: StudyConfig) -> str:
    return f"{c.grpo_prompts} prompts x {c.grpo_group} samples"


# In training order: a method's start comes before it.
METHODS = (
    Method("teacher", "the teacher preset, SFT on the train split", None,
           lambda c: c.teacher_steps, sequences, train_sft),
    Method("base", "the student preset, short SFT (the 'Instruct' starting point)", None,
           lambda c: c.base_steps, sequences, train_sft),
    Method("sft", "base + more SFT on the train labels", "base", lambda c: c.variant_steps, sequences, train_sft),
    Method("seq_kd", "base + SFT on the teacher's sampled traces (sequence-level KD)", "base",
           lambda c: c.variant_steps, sequences, train_seq_kd),
    Method("kd_forward", "base + logit KD, alpha*CE + (1-alpha)*KL(teacher||student)", "base",
           lambda c: c.variant_steps, sequences, train_kd),
    Method("kd_reverse", "base + logit KD, alpha*CE + (1-alpha)*KL(student||teacher)", "base",
           lambda c: c.variant_steps, sequences, train_kd),
    Method("grpo", "base + GRPO on the train questions (reward: the answer is correct)", "base",
           lambda c: c.grpo_steps, rollouts, train_grpo),
    Method("sft_grpo", "sft + the same GRPO", "sft", lambda c: c.grpo_steps, rollouts, train_grpo),
    Method("kd_grpo", "kd_forward + the same GRPO", "kd_forward", lambda c: c.grpo_steps, rollouts, train_grpo),
)
RL_METHODS = ("grpo", "sft_grpo", "kd_grpo")


# ------------------------------------------------------------------ evaluation

def eval_params(run: Run) -> dict[str, SamplingParams]:
    """Greedy (pass@1) and `pass_k` samples per problem at `temperature` (pass@k)."""
    cfg = run.cfg
    return {"greedy": SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0),
            "sampled": SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      n=cfg.pass_k, seed=run.seed)}


def evaluate_method(run: Run, name: str) -> dict:
    """{split: {mode: eval summary}} of a method's final model, cached in <seed dir>/eval/<name>/<split>_<mode>/."""
    out = run.root / "eval" / name

    def work():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(run.final(name), str(run.data / "tokenizer"), device)
        for split in SPLITS:
            rows = load_gsm8k(run.data / f"{split}.jsonl")
            for mode, params in eval_params(run).items():
                evaluate(model, tokenizer, rows, "synthetic", params, "chat", run.cfg.eval_batch,
                         out_dir=out / f"{split}_{mode}", progress=False)
    stage(out, run.force, work)
    return {split: {mode: json.loads((out / f"{split}_{mode}" / "summary.json").read_text())
                    for mode in eval_params(run)} for split in SPLITS}


def run_seed(run: Run) -> dict:
    """Train (in METHODS order: every start precedes its users) and evaluate each method of one seed."""
    results = {}
    for method in METHODS:
        seconds = method.train(run, method)
        results[method.name] = {"train_seconds": seconds, "eval": evaluate_method(run, method.name)}
    return results


# ------------------------------------------------------------------ report

def wilson(successes: float, n: int) -> list[float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927), as [low, high]."""
    p, z2 = successes / n, Z95 ** 2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def metric(values: list[float], problems: int) -> dict:
    """Mean over seeds, std across seeds, and the Wilson interval of the attempts pooled over seeds.

    Both reported metrics are proportions of problems: greedy pass@1 (one sample, score 0/1) and
    pass@k from exactly k samples (the share of problems with a correct sample).
    """
    mean = statistics.fmean(values)
    return {"mean": mean, "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values,
            "ci95": wilson(mean * problems * len(values), problems * len(values))}


def aggregate(cfg: StudyConfig, per_seed: list[dict], vocab_size: int) -> dict:
    """results.json's "methods": every method x split, mean over seeds."""
    k = f"pass@{cfg.pass_k}"
    methods = {}
    for method in METHODS:
        model = preset(cfg, method)
        entry = {"what": method.what, "start": method.start or f"random init ({model})",
                 "budget": f"{method.steps(cfg)} steps x {method.per_step(cfg)}",
                 "params": replace(PRESETS[model], vocab_size=vocab_size).num_parameters}
        runs = [seed[method.name] for seed in per_seed]
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


def cell(m: dict) -> str:
    low, high = m["ci95"]
    spread = f" ± {100 * m['std']:.1f}" if len(m["per_seed"]) > 1 else ""
    return f"{100 * m['mean']:.1f}{spread} [{100 * low:.1f}, {100 * high:.1f}]"


def preamble(cfg: StudyConfig, seeds: int) -> list[str]:
    """What the table's figures are and every method's training budget."""
    return [
        f"Synthetic GSM8K-style task: {cfg.n_train} train rows (1-3 steps), test {cfg.n_test} (1-3 steps), "
        f"harder {cfg.n_harder} (4-5 steps). Accuracy in % over {seeds} seed(s): mean"
        f"{' ± std across seeds' if seeds > 1 else ''} [95% Wilson interval of the attempts]. "
        f"Sampled: {cfg.pass_k} samples per problem at temperature {cfg.temperature}; "
        f"max {cfg.max_new_tokens} new tokens. Train s: the method's own stages (seq_kd includes the "
        f"teacher's sampling); variants also build on base's.", "",
        f"Budgets: the teacher trains {cfg.teacher_steps} optimizer steps of {cfg.batch_size} sequences at lr "
        f"{cfg.teacher_lr}, base {cfg.base_steps} at lr {cfg.lr}, and every variant {cfg.variant_steps} more "
        f"from base at lr {cfg.lr}. seq_kd: the teacher answers {cfg.gen_questions} train questions "
        f"{cfg.gen_samples} times at temperature {cfg.gen_temperature} "
        f"({'correct traces only' if cfg.only_correct else 'every finished trace'}). Logit KD: "
        f"{cfg.kd_alpha} * CE + {1 - cfg.kd_alpha} * KL, temperature 1. GRPO: {cfg.grpo_steps} rollout batches "
        f"of {cfg.grpo_prompts} train questions x {cfg.grpo_group} samples at temperature 1, one optimizer "
        f"step each, lr {cfg.grpo_lr}."]


def markdown(cfg: StudyConfig, methods: dict, seeds: int) -> str:
    columns = ("greedy pass@1", f"sampled pass@{cfg.pass_k}")
    head = ["method", "starts from", "budget", "params", "train s", *[f"{s} {c}" for s in SPLITS for c in columns]]
    lines = ["# Study results", "", *preamble(cfg, seeds), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        row = [name, m["start"], m["budget"], f"{m['params'] / 1e6:.2f}M",
               f"{m['train_seconds']:.0f}" if m["train_seconds"] is not None else "?",
               *[cell(m["splits"][split][column]) for split in SPLITS for column in columns]]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Methods:", *[f"- {name}: {m['what']}" for name, m in methods.items()]]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot with a file backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(methods: dict, path: Path) -> str:
    """Grouped bars: greedy pass@1 per method, one bar per split, 95% Wilson intervals as error bars."""
    plt = pyplot()
    if plt is None:
        return f"{path.name}: skipped, matplotlib is not installed"
    done = list(methods)
    fig, ax = plt.subplots(figsize=(1.2 * len(done) + 2, 4))
    width = 0.8 / len(SPLITS)
    for i, split in enumerate(SPLITS):
        ms = [methods[name]["splits"][split]["greedy pass@1"] for name in done]
        means = [100 * m["mean"] for m in ms]
        errors = [[100 * (m["mean"] - m["ci95"][0]) for m in ms], [100 * (m["ci95"][1] - m["mean"]) for m in ms]]
        ax.bar([j + (i - (len(SPLITS) - 1) / 2) * width for j in range(len(done))], means, width, yerr=errors,
               capsize=3, label=split)
    ax.set_xticks(range(len(done)), done, rotation=20)
    ax.set_ylabel("greedy pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{path.name}: written"


def plot_rl_curve(root: Path, seeds: int, path: Path) -> str:
    """Rollout accuracy (mean correctness reward of the step's samples) over GRPO steps, mean over seeds."""
    plt = pyplot()
    if plt is None:
        return f"{path.name}: skipped, matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in RL_METHODS:
        runs = [read_metrics(root / f"seed_{seed}" / name / "metrics.jsonl") for seed in range(seeds)]
        steps = [r["step"] for r in runs[0]]
        ax.plot(steps, [100 * statistics.fmean(run[i]["accuracy"] for run in runs) for i in range(len(steps))],
                marker=".", label=name)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("rollout accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{path.name}: written"


def headline(methods: dict) -> str:
    """The targets' figures: teacher test accuracy and the best student relative to it."""
    def test(name):
        return methods[name]["splits"]["test"]["greedy pass@1"]["mean"]
    best = max((name for name in methods if name != "teacher"), key=test)
    ratio = f"{test(best) / test('teacher'):.0%}" if test("teacher") > 0 else "n/a"
    lifts = ", ".join(f"{name} {100 * (test(name) - test(start)):+.1f} over {start}"
                      for name, start in ((m.name, m.start) for m in METHODS if m.name in RL_METHODS))
    return (f"Teacher test pass@1 {test('teacher'):.1%}. Best student: {best}, {test(best):.1%} = {ratio} of the "
            f"teacher with {methods[best]['params'] / methods['teacher']['params']:.2f}x its parameters. "
            f"GRPO lift (test pass@1 points): {lifts}.")


def stage_seconds(out: Path) -> float:
    """The study's compute time: every stage's stored seconds (data, training, generation, evaluation)."""
    return round(sum(float(path.read_text()) for path in out.rglob("seconds.txt")), 1)


def write_report(out: Path, cfg: StudyConfig, methods: dict, seeds: int):
    total = stage_seconds(out)
    results = {"config": asdict(cfg), "seeds": seeds, "stage_seconds": total, "methods": methods}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = (markdown(cfg, methods, seeds) + "\n" + headline(methods) + "\n\n"
             f"All stages (data, training, generation, evaluation; {seeds} seed(s)): {total:.0f} s.\n")
    (out / "results.md").write_text(table)
    print(table)
    print(plot_results(methods, out / "results.png"))
    print(plot_rl_curve(out, seeds, out / "rl_curve.png"))


# ------------------------------------------------------------------ main

def parse_args(argv):
    p = cli.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/study", help="study directory (stages are cached in it)")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the machinery in about two minutes")
    p.add_argument("--seeds", type=int, default=1, help="train every model with seeds 0..N-1; report mean ± std")
    p.add_argument("--force", action="store_true", help="redo every stage")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    return args


def check_config(out: Path, cfg: StudyConfig, force: bool):
    """Cached stages are reused only by the config that made them."""
    path, text = out / "study_config.json", json.dumps(asdict(cfg), indent=2) + "\n"
    if path.exists() and path.read_text() != text and not force:
        raise ValueError(f"{out} holds a study with another config ({path}); pass --force or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> int:
    """0 when the report is written, 2 with a one-line error otherwise (trainer/cli.py)."""
    return cli.run(run_study, argv)


def run_study(argv):
    args = parse_args(argv)
    cfg = QUICK if args.quick else StudyConfig()
    out = Path(args.out)
    check_config(out, cfg, args.force)
    prepare_data(cfg, out / "data", args.force)
    per_seed = [run_seed(Run(cfg, seed, out / "data", out / f"seed_{seed}", args.force)) for seed in range(args.seeds)]
    vocab_size = load_tokenizer(out / "data" / "tokenizer").vocab_size
    write_report(out, cfg, aggregate(cfg, per_seed, vocab_size), args.seeds)


if __name__ == "__main__":
    sys.exit(main())
