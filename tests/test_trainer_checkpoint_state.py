"""trainer/checkpoint.py: a checkpoint restores model, optimizer and RNG states; keep_last; torn files."""
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from trainer.config import OptimConfig, TrainConfig
from trainer.run import build_optimizer
from trainer.supervised import sft_loss
from trainer_helpers import random_batch, tiny


def test_checkpoint_round_trip_restores_everything_and_keeps_last(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig())
    sft_loss(model, random_batch([6, 4]), TrainConfig())[0].backward()
    optimizer.step()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, step, {"config": {"x": 1}}, keep_last=2, is_main=True, sharded=False)
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    fresh = tiny(seed=3)
    fresh_opt = build_optimizer(fresh, OptimConfig())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    state = load_checkpoint(checkpoint_paths(tmp_path)[-1], fresh, fresh_opt, 0, 1, sharded=False)
    assert state["step"] == 3 and state["config"] == {"x": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
    torn = tmp_path / "checkpoints" / "step_00000009.pt"
    torn.write_bytes(checkpoint_paths(tmp_path)[-1].read_bytes()[:1000])
    with pytest.raises(ValueError, match="step_00000009.pt is unreadable"):
        load_checkpoint(torn, fresh, fresh_opt, 0, 1, sharded=False)
    with pytest.raises(ValueError, match="written by 1 ranks"):
        load_checkpoint(checkpoint_paths(tmp_path)[0], fresh, fresh_opt, 0, 2, sharded=False)
