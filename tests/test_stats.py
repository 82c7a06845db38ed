"""data/stats.py: the paired bootstrap against hand-computed cases, and the verdict wording."""
from __future__ import annotations

import numpy as np
import pytest

from data.stats import Paired, bootstrap_deltas, paired_difference, verdict


def test_one_seed_two_problems_matches_the_exact_bootstrap_distribution():
    # d = a - b = [1, 0]: resampling 2 problems gives mean 0 (prob 1/4), 1/2 (1/2) or 1 (1/4); with
    # one seed the seed resampling is the identity. Percentiles 2.5 / 97.5: 0 and 1.
    a, b = [[1, 0]], [[0, 0]]
    deltas = bootstrap_deltas(a, b, draws=4000)
    for value, prob in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(deltas == value) == pytest.approx(prob, abs=0.03)
    p = paired_difference(a, b)
    assert (p.delta, p.low, p.high, p.seeds, p.problems) == (0.5, 0.0, 1.0, 1, 2)


def test_two_seeds_resample_seeds_as_well():
    # d rows: seed 0 all +1, seed 1 all 0 (same for every problem). Each draw's mean is the share of
    # seed-0 draws: 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, whatever the problem resampling.
    a = np.array([[1, 1, 1], [0, 0, 0]])
    b = np.zeros((2, 3))
    deltas = bootstrap_deltas(a, b, draws=4000)
    assert set(np.unique(deltas)) <= {0.0, 0.5, 1.0}
    assert np.mean(deltas == 0.5) == pytest.approx(0.5, abs=0.03)
    assert paired_difference(a, b).delta == 0.5


def test_pairing_cancels_what_both_methods_share():
    # A solves B's problems and also problems 0-39: every difference is >= 0, the interval excludes 0 ...
    rng = np.random.default_rng(1)
    b = rng.integers(0, 2, size=(3, 200))
    a = b.copy()
    a[:, :40] = 1
    p = paired_difference(a, b)
    assert p.delta == pytest.approx(np.mean(a - b)) and p.low > 0 and p.detected
    # ... and a method against itself: exactly 0, interval [0, 0]
    assert paired_difference(b, b) == Paired(0.0, 0.0, 0.0, 3, 200)


def test_the_bootstrap_is_seeded():
    a, b = np.eye(3), np.zeros((3, 3))
    assert paired_difference(a, b) == paired_difference(a, b)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_verdict_wording():
    assert verdict("kd", "sft", Paired(0.12, 0.05, 0.19, 3, 200)) == "kd > sft: +12.0 points [+5.0, +19.0]"
    assert verdict("grpo", "base", Paired(-0.1, -0.15, -0.02, 3, 200)) == "grpo < base: -10.0 points [-15.0, -2.0]"
    assert verdict("kd", "sft", Paired(0.02, -0.01, 0.05, 3, 200)) == (
        "no detectable difference between kd and sft: +2.0 points [-1.0, +5.0] includes 0")
    # an interval touching 0 is not a finding
    assert verdict("a", "b", Paired(0.0, 0.0, 0.0, 1, 1)).startswith("no detectable difference")
