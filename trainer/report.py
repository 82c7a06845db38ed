"""What a study's report is made of (study.py's embedded study and trainer/grid.py's configured grid):
accuracy as a proportion with its 95% Wilson interval, pooled over seeds; markdown tables; the grouped
bar plot of greedy pass@1; the stage time a run directory stored; and where the figures come from
(machine, commit, wall time)."""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

Z95 = 1.959964  # two-sided 95% normal quantile


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


def cell(m: dict) -> str:
    """A metric in %: mean (± std across seeds when there are several) [95% Wilson interval]."""
    low, high = m["ci95"]
    spread = f" ± {100 * m['std']:.1f}" if len(m["per_seed"]) > 1 else ""
    return f"{100 * m['mean']:.1f}{spread} [{100 * low:.1f}, {100 * high:.1f}]"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in rows]]


def pyplot():
    """matplotlib.pyplot with a file backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(greedy: dict[str, dict[str, dict]], path: Path) -> str:
    """Grouped bars: greedy pass@1 per method ({method: {split: metric}}), one bar per split, 95% Wilson
    intervals as error bars."""
    plt = pyplot()
    if plt is None:
        return f"{path.name}: skipped, matplotlib is not installed"
    done = list(greedy)
    splits = list(greedy[done[0]])
    fig, ax = plt.subplots(figsize=(1.2 * len(done) + 2, 4))
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        ms = [greedy[name][split] for name in done]
        means = [100 * m["mean"] for m in ms]
        errors = [[100 * (m["mean"] - m["ci95"][0]) for m in ms], [100 * (m["ci95"][1] - m["mean"]) for m in ms]]
        ax.bar([j + (i - (len(splits) - 1) / 2) * width for j in range(len(done))], means, width, yerr=errors,
               capsize=3, label=split)
    ax.set_xticks(range(len(done)), done, rotation=20)
    ax.set_ylabel("greedy pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{path.name}: written"


def stage_seconds(out: Path) -> float:
    """A run's compute time: every stage's stored seconds (data, training, generation, evaluation)."""
    return round(sum(float(path.read_text()) for path in out.rglob("seconds.txt")), 1)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def commit() -> str:
    """git rev-parse HEAD of this checkout, "+ uncommitted changes" when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def provenance(jobs: int, wall: float) -> list[str]:
    """Machine, code and wall time of this invocation (results.md only: results.json stays the same on a re-run)."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return [f"Machine: {cpu_model()}, {os.cpu_count()} cores{gpu}; {jobs} worker(s) of one torch thread; "
            f"torch {torch.__version__}, Python {platform.python_version()}.",
            f"Commit: {commit()}.", f"Wall time of this invocation: {wall:.0f} s (cached stages are skipped)."]
