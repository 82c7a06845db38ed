"""data/passk.py: pass@k against hand-computed values and the closed form, maj@k votes and tie rule."""
from math import comb

import pytest

from data.passk import maj_at_k, pass_at_k, report_ks


def test_pass_at_k_hand_computed():
    # 1 - C(n-c, k) / C(n, k)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # C(3,2)=3, C(5,2)=10
    assert pass_at_k(100, 1, 10) == pytest.approx(1 - 90 / 100)     # C(99,10)/C(100,10) = 90/100
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)                 # k=1 is c/n
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0                                # n-c=1 < k: every pair has a hit
    for n, c, k in [(20, 7, 5), (200, 13, 100), (7, 1, 7)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_maj_at_k_vote_and_tie_rule():
    assert maj_at_k(["2", "3", "3"], [1.0, 0.0, 0.0], 3) == 0.0     # "3" has 2 votes
    assert maj_at_k(["2", "3", "3"], [1.0, 0.0, 0.0], 1) == 1.0     # first sample only
    assert maj_at_k(["7", "3", "3", "7"], [0.0, 1.0, 1.0, 0.0], 4) == 0.0  # 2-2 tie: first seen ("7") wins
    assert maj_at_k(["3", "7", "7", "3"], [1.0, 0.0, 0.0, 1.0], 4) == 1.0
    assert maj_at_k([None, None, "2"], [0.0, 0.0, 1.0], 3) == 1.0   # no answer, no vote
    assert maj_at_k([None], [0.0], 1) == 0.0
    assert report_ks(1) == [1] and report_ks(8) == [1, 2, 4, 8] and report_ks(10) == [1, 2, 4, 8, 10]
