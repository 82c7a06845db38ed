"""trainer/batches.py: rank shards of the global batch, padding and shifted targets."""
import pytest

from trainer.batches import collate, rank_micro_batches, shifted_targets
from trainer.supervised import count_tokens


def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    examples = [([i], [i]) for i in range(23)]  # 23 examples, global batch 2 x 3 x 2 = 12 -> 1 step per epoch
    def ids(step, rank, world, mb, accum):
        return [e[0][0] for m in rank_micro_batches(examples, step, 5, mb, accum, rank, world) for e in m]
    for step in range(3):
        shards = [ids(step, r, 2, 2, 3) for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(ids(step, 0, 1, 4, 3))  # the same global batch, split differently
        assert len(set(shards[0] + shards[1])) == 12
    assert ids(0, 0, 2, 2, 3) == ids(0, 0, 2, 2, 3)  # deterministic
    assert ids(0, 0, 2, 2, 3) != ids(1, 0, 2, 2, 3)  # a new epoch reshuffles
    with pytest.raises(ValueError, match="fewer than one global batch"):
        rank_micro_batches(examples[:5], 0, 0, 2, 3, 0, 1)


def test_collate_right_pads_and_shifts():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert shifted_targets(batch["labels"]).tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert count_tokens(batch).item() == 2
