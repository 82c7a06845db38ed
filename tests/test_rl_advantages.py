"""rl/advantages.py against hand-computed group statistics, and a real 2-rank gloo split."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from rl.advantages import global_std, group_advantages, zero_std_groups
from rl.grpo import GRPOConfig

# Two prompts, four samples each.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                        [1.0, 1.0, 1.0, 0.0]])


def test_group_scaling_hand_numbers():
    # Group 0: mean 0.5, population std 0.5 -> (r - 0.5) / 0.5 = +-1.
    # Group 1: mean 0.75, std sqrt(0.75 * 0.25) = 0.4330127 -> 0.25 / 0.4330127 = 0.5773503, -0.75 / 0.4330127 = -1.7320508.
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0],
                             [0.5773503, 0.5773503, 0.5773503, -1.7320508]])
    torch.testing.assert_close(group_advantages(REWARDS, "grpo", eps=0.0), expected)


def test_no_scaling_is_mean_baseline_only():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5],
                             [0.25, 0.25, 0.25, -0.75]])
    torch.testing.assert_close(group_advantages(REWARDS, "dr_grpo"), expected)


def test_batch_scaling_divides_by_one_batch_std():
    # All 8 rewards: mean 5/8, population variance 5/8 * 3/8 = 0.234375, std 0.4841229.
    std = math.sqrt(0.234375)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5],
                             [0.25, 0.25, 0.25, -0.75]]) / std
    torch.testing.assert_close(group_advantages(REWARDS, "batch_std", eps=0.0), expected)
    torch.testing.assert_close(global_std(REWARDS), torch.tensor(std))


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # Group 0 [1, 0, 0, 1]: sample 0's baseline (0 + 0 + 1) / 3 -> 1 - 1/3; sample 1's (1 + 0 + 1) / 3 -> -2/3.
    # Group 1 [1, 1, 1, 0]: samples 0-2 see (1 + 1 + 0) / 3 -> 1/3; sample 3 sees 1 -> -1.
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3],
                             [1 / 3, 1 / 3, 1 / 3, -1.0]])
    torch.testing.assert_close(group_advantages(REWARDS, "rloo"), expected)


def test_eps_added_to_std():
    torch.testing.assert_close(group_advantages(REWARDS[:1], "grpo", eps=0.5),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_zero_variance_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.2]])
    assert zero_std_groups(rewards).tolist() == [True, False, True, False]
    adv = group_advantages(rewards, "grpo")
    assert torch.all(adv[[0, 2]] == 0)  # no signal, and no division by zero


def test_bad_inputs():
    with pytest.raises(ValueError, match="advantage must be one of"):
        GRPOConfig(advantage="std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(REWARDS.view(-1), "grpo")


def _rank_worker(rank, init_file, rewards, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    shard = rewards.chunk(2)[rank]  # whole groups per rank, as rl/rollout.py shards them
    result = {mode: group_advantages(shard, mode) for mode in ("grpo", "batch_std", "dr_grpo")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank():
    """Real 2-process gloo group: each rank holds two whole groups; batch std is the global one."""
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.2, 0.9, 0.4]])
    mp.set_forkserver_preload(["torch", "rl.grpo"])  # imported once by the server, not per rank
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_worker, args=(os.path.join(tmp, "init"), rewards, tmp), nprocs=2,
                           start_method="forkserver")  # forked from a clean server process
        parts = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for mode in ("grpo", "batch_std", "dr_grpo"):
        two_ranks = torch.cat([parts[0][mode], parts[1][mode]])
        torch.testing.assert_close(two_ranks, group_advantages(rewards, mode), rtol=1e-6, atol=1e-6)
    # And the batch mode differs from what a rank would get from its own shard alone.
    assert not torch.allclose(parts[0]["batch_std"], group_advantages(rewards[:2], "batch_std"))
