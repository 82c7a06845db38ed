"""rl/rollout.py: packing, sampler vs trainer log-probs, micro-batch slicing, rank sharding."""
import pytest
import torch

from model.config import PRESETS
from model.generate import SamplingParams
from model.transformer import Transformer
from rl.grpo import completion_logprobs
from rl.rollout import rollout, rollout_batches

STOP_IDS = list(range(60))  # ~12% of the vocabulary: completions end at varied lengths


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-student"])


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(60, 512, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


PARAMS = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, n=3, seed=5)


def test_pack_layout(model):
    prompts = _prompts(4)
    batch = rollout(model, prompts, ["r0", "r1", "r2", "r3"], PARAMS, STOP_IDS)
    P = batch.prompt_length
    assert len(batch) == 12 and batch.group_size == 3 and P == max(map(len, prompts))
    assert {c.finish_reason for c in batch.completions} == {"stop", "length"}  # the test covers both
    for row, c in enumerate(batch.completions):
        assert (c.prompt_index, c.sample_index) == (row // 3, row % 3)  # prompt-major rows
        prompt, n = prompts[row // 3], len(c.tokens)
        assert batch.input_ids[row, P - len(prompt):P].tolist() == prompt
        assert batch.input_ids[row, P:P + n].tolist() == c.tokens
        assert batch.attention_mask[row].tolist() == [0] * (P - len(prompt)) + [1] * (len(prompt) + n) + \
            [0] * (batch.input_ids.shape[1] - P - n)
        assert batch.completion_mask[row].sum().item() == n
        assert batch.truncated[row].item() == (c.finish_reason == "length")
        assert batch.references[row] == f"r{row // 3}"


def test_sampler_logprobs_equal_trainer_logprobs(model):
    batch = rollout(model, _prompts(5, seed=1), [None] * 5, PARAMS, STOP_IDS)
    with torch.no_grad():
        trainer = completion_logprobs(model, batch, chunk_size=7)  # (B, C)
    mask = batch.completion_mask
    assert mask.sum() > 30
    torch.testing.assert_close(trainer[mask], batch.sampler_logprobs[mask], rtol=0, atol=1e-5)
    assert torch.all(trainer[~mask] == 0)


def test_select_trims_padding_and_keeps_values(model):
    batch = rollout(model, _prompts(5, seed=2), [None] * 5, PARAMS, STOP_IDS)
    with torch.no_grad():
        full = completion_logprobs(model, batch, chunk_size=64)
        rows = slice(4, 9)
        part = batch.select(rows)
        sub = completion_logprobs(model, part, chunk_size=64)
    C = part.completion_mask.shape[1]
    assert part.input_ids.shape[1] <= batch.input_ids.shape[1]
    assert part.attention_mask[:, 0].any() and part.attention_mask[:, -1].any()  # no all-padding edge column
    torch.testing.assert_close(sub, full[rows, :C], rtol=0, atol=1e-5)
    assert not batch.completion_mask[rows, C:].any()


def test_rank_shards_hold_whole_groups(model):
    prompts, refs = _prompts(8, seed=3), list(range(8))
    params = SamplingParams(max_new_tokens=2, temperature=1.0, n=2, seed=0)
    one = list(rollout_batches(model, prompts, refs, params, STOP_IDS, prompts_per_step=4))
    two = [list(rollout_batches(model, prompts, refs, params, STOP_IDS, prompts_per_step=4, rank=r, world_size=2))
           for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 2
    for step in range(2):
        assert one[step].references == two[0][step].references + two[1][step].references
        for batch in (two[0][step], two[1][step]):
            assert batch.references[::2] == batch.references[1::2]  # both samples of a prompt on one rank
    # Ranks and steps draw with different seeds.
    assert two[0][0].completions[0].tokens != two[1][0].completions[0].tokens or \
        two[0][0].completions[1].tokens != two[1][0].completions[1].tokens
    with pytest.raises(ValueError, match="multiple of world_size"):
        next(rollout_batches(model, prompts, refs, params, STOP_IDS, prompts_per_step=3, world_size=2))
