"""Paired comparisons of two methods evaluated on the same problems with the same seeds.

Scores are arrays of shape (seeds, problems): score[s, i] in [0, 1] is method's result on problem i
in seed s's study (greedy pass@1: 0 or 1). Methods A and B are paired: row s of both comes from the
same seed, column i from the same problem. The statistic is the mean paired difference

    delta = 1 / (S * P) * sum_{s, i} (a[s, i] - b[s, i])

Its 95% interval comes from a two-way paired bootstrap: each of B draws resamples the S seeds i.i.d.
with replacement and, independently, the P problems i.i.d. with replacement, the same seed and
problem indices for A and B (paired); the draw's statistic is the mean of d = a - b over the
resampled seeds x problems. The interval is the 2.5th and 97.5th percentiles of the B statistics
(percentile bootstrap). Resampling both ways makes the interval cover seed-to-seed variation
(init, data order, sampling) as well as the choice of test problems. With counts n_s (how often
seed s was drawn) and m_i (problem i), a draw's statistic is n^T d m / (S * P), which is how it is
computed. With one seed the seed resampling is the identity: the interval then covers the problems
only, and says nothing about training noise.

A comparison is a finding only when its interval excludes 0; otherwise it reads "no detectable
difference" (`verdict`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Paired:
    """delta = mean(A - B) over seeds x problems, and its percentile-bootstrap 95% interval [low, high]."""
    delta: float
    low: float
    high: float
    seeds: int
    problems: int

    @property
    def detected(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_deltas(a, b, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The `draws` bootstrap statistics of mean(a - b) (module docstring), from a seeded generator."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired scores must be non-empty arrays of shape (seeds, problems), got {d.shape}")
    n_seeds, n_problems = d.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=draws)  # (draws, S)
    problem_counts = rng.multinomial(n_problems, np.full(n_problems, 1 / n_problems), size=draws)  # (draws, P)
    return np.einsum("bs,sp,bp->b", seed_counts, d, problem_counts) / (n_seeds * n_problems)


def paired_difference(a, b, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> Paired:
    """Mean paired difference A - B and its 95% percentile-bootstrap interval (module docstring)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape (seeds, problems), got {a.shape} and {b.shape}")
    deltas = bootstrap_deltas(a, b, draws, seed)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return Paired(float(np.mean(a - b)), float(low), float(high), a.shape[0], a.shape[1])


def verdict(a: str, b: str, p: Paired) -> str:
    """The comparison in words, in percentage points: a finding only when the interval excludes 0."""
    figures = f"{100 * p.delta:+.1f} points [{100 * p.low:+.1f}, {100 * p.high:+.1f}]"
    if p.low > 0:
        return f"{a} > {b}: {figures}"
    if p.high < 0:
        return f"{a} < {b}: {figures}"
    return f"no detectable difference between {a} and {b}: {figures} includes 0"
