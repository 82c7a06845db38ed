"""trainer/run.py: the LR schedule against its closed form."""
import pytest

from trainer.config import OptimConfig
from trainer.run import lr_at


def test_lr_schedule_matches_closed_form():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 104) == pytest.approx(1.0)
    assert lr_at(54, cfg, 104) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_at(104, cfg, 104) == pytest.approx(0.1)
    for s in range(4, 104):
        assert lr_at(s + 1, cfg, 104) <= lr_at(s, cfg, 104)
