"""trainer/run.py: the LR schedule against its closed form."""
from dataclasses import asdict
from pathlib import Path

import pytest

from trainer.config import OptimConfig, TrainConfig
from trainer.run import check_resumed_run, lr_at


def test_lr_schedule_matches_closed_form():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 104) == pytest.approx(1.0)
    assert lr_at(54, cfg, 104) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_at(104, cfg, 104) == pytest.approx(0.1)
    for s in range(4, 104):
        assert lr_at(s + 1, cfg, 104) <= lr_at(s, cfg, 104)


def test_resume_check_compares_content_and_refuses_old_checkpoints():
    cfg = TrainConfig(model="m", out="o")
    with pytest.raises(ValueError, match="written by an older srlm"):
        check_resumed_run({"config": asdict(cfg)}, cfg, {"training data": "x"}, Path("o/checkpoints/step_1.pt"))
    with pytest.raises(ValueError, match="trained on other content: training data changed"):
        check_resumed_run({"config": asdict(cfg), "inputs": {"training data": "y"}}, cfg, {"training data": "x"},
                          Path("o/checkpoints/step_1.pt"))
    moved = TrainConfig(model="m", out="elsewhere/o")
    check_resumed_run({"config": asdict(cfg), "inputs": {"training data": "x"}}, moved, {"training data": "x"},
                      Path("elsewhere/o/checkpoints/step_1.pt"))  # only the place changed: accepted
