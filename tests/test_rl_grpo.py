"""rl/grpo.py: the update equals REINFORCE on-policy, is invariant to micro-batching and to a 2-rank
split (real gloo DDP), mu > 1 starts from the same step, and a tiny model learns a verifiable toy task."""
import copy
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import WidestVocabTensor
from model.config import ModelConfig
from model.transformer import Transformer
from rl.grpo import GRPOConfig, grpo_step, grpo_update, sequence_weights
from rl.rewards import RewardFn
from rl.rollout import rollout, rollout_batches

TOY = ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=10_000.0,
                  max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True, qk_norm=False)
STOP_IDS = [0, 1]
ROOT = Path(__file__).resolve().parents[1]
G = 4


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(TOY)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 16, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _batch(model, n_prompts=4, seed=0, max_new_tokens=6):
    cfg = GRPOConfig(group_size=G, max_new_tokens=max_new_tokens, seed=seed)
    return rollout(model, _prompts(n_prompts, seed), [None] * n_prompts, cfg.sampling_params(), STOP_IDS)


def _even_fraction(completions, references):
    """An arbitrary verifiable score: fraction of even tokens in the completion."""
    return [sum(t % 2 == 0 for t in c.tokens) / len(c.tokens) for c in completions]


EVEN = RewardFn("even", _even_fraction)


def _rewards(batch):
    return torch.tensor(_even_fraction(batch.completions, batch.references))


def _sgd_delta(model, batch, advantages, cfg, drop=None):
    """-(parameter change) of one SGD(lr=1) step without clipping = the gradient grpo_update applied."""
    trained = copy.deepcopy(model)
    metrics = grpo_update(trained, None, torch.optim.SGD(trained.parameters(), lr=1.0), batch, advantages, cfg, drop=drop)
    return [p0.detach() - p1.detach() for p0, p1 in zip(model.parameters(), trained.parameters())], metrics


def _reinforce(model, batch, advantages, aggregation, max_new_tokens):
    """Independent reference from full logits: gradients of -sum A_i log pi(o_it) / normaliser, the
    loss value at ratio 1 (-sum A_i / normaliser over tokens) and the mean entropy per completion token."""
    model.zero_grad()
    P = batch.prompt_length
    logp_all = model(batch.input_ids, attention_mask=batch.attention_mask)[:, P - 1:-1].log_softmax(-1)  # (B, C, V)
    logp = logp_all.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)  # (B, C)
    mask = batch.completion_mask.float()
    n_tokens = mask.sum(1)
    if aggregation == "grpo":  # mean over each sequence's tokens, then over the sequences
        weights = 1 / (n_tokens * len(batch))
    elif aggregation == "dapo":  # token sum over all tokens of the batch
        weights = torch.full_like(n_tokens, 1 / n_tokens.sum().item())
    else:  # dr_grpo: token sum over (sequences x max_new_tokens)
        weights = torch.full_like(n_tokens, 1 / (len(batch) * max_new_tokens))
    loss = -(weights * advantages * (logp * mask).sum(1)).sum()
    loss.backward()
    value = -(weights * advantages * n_tokens).sum().item()
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum().item() / mask.sum().item()
    return [p.grad.clone() for p in model.parameters()], value, entropy


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_update_is_reinforce_with_group_advantages(aggregation):
    model = _model()
    batch = _batch(model)
    assert len(set(batch.completion_mask.sum(1).tolist())) > 1  # ragged completions
    rewards = _rewards(batch)
    # Group-normalised advantages written out: (r - group mean) / (population group std + 1e-4).
    grouped = rewards.view(-1, G)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)
    cfg = GRPOConfig(group_size=G, max_new_tokens=6, aggregation=aggregation, micro_batch_size=3, max_grad_norm=0)
    torch.testing.assert_close(sequence_weights(batch, rewards, cfg)[0], advantages)
    delta, metrics = _sgd_delta(model, batch, advantages, cfg)
    grads, value, entropy = _reinforce(model, batch, advantages, aggregation, cfg.max_new_tokens)
    for d, g in zip(delta, grads):
        torch.testing.assert_close(d, g, rtol=1e-4, atol=1e-6)
    assert metrics["loss"] == pytest.approx(value, abs=1e-5)
    assert metrics["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert metrics["clip_frac"] == 0 and metrics["kl"] == 0
    assert metrics["loss_tokens"] == batch.completion_mask.sum().item()


def test_micro_batch_size_does_not_change_the_update():
    model = _model(1)
    batch = _batch(model, seed=1)
    advantages = torch.randn(len(batch))
    deltas = [_sgd_delta(model, batch, advantages, GRPOConfig(group_size=G, micro_batch_size=m, max_grad_norm=0))[0]
              for m in (1, 5, len(batch))]
    for other in deltas[1:]:
        for a, b in zip(deltas[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_dropped_rows_change_nothing_but_the_loss_set():
    """filter/truncation drops act as if the rows were absent (dapo normaliser counts kept tokens only)."""
    model = _model(2)
    batch = _batch(model, seed=2)
    advantages = torch.randn(len(batch))
    drop = torch.zeros(len(batch), dtype=torch.bool)
    drop[:G] = True  # the first group
    cfg = GRPOConfig(group_size=G, max_grad_norm=0)
    kept = batch.select(slice(G, len(batch)))
    for a, b in zip(_sgd_delta(model, batch, advantages, cfg, drop)[0], _sgd_delta(model, kept, advantages[G:], cfg)[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    everything = torch.ones(len(batch), dtype=torch.bool)
    assert grpo_update(model, None, torch.optim.SGD(model.parameters(), lr=1.0), batch, advantages, cfg,
                       drop=everything) == {"skipped": 1.0}


def test_sequence_weights_filters_zero_std_groups_and_truncated():
    batch = _batch(_model(3), n_prompts=3, seed=3, max_new_tokens=3)
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    cfg = GRPOConfig(group_size=G, max_new_tokens=3, filter_zero_std=True)
    assert sequence_weights(batch, rewards, cfg)[1].tolist() == [True] * 4 + [False] * 4 + [True] * 4
    cfg = GRPOConfig(group_size=G, max_new_tokens=3, mask_truncated=True)
    assert sequence_weights(batch, rewards, cfg)[1].tolist() == batch.truncated.tolist()


def test_mu_two_first_step_equals_on_policy_step():
    """With mu = 2 the old log-probs are the sampler's; they equal the trainer's, so step 1 is the mu = 1 step."""
    model = _model(4)
    batch = _batch(model, seed=4)
    advantages = torch.randn(len(batch))
    after_first = []

    class Snapshot:  # the scheduler hook runs after every optimizer step
        def __init__(self, m):
            self.m = m

        def step(self):
            after_first.append([p.detach().clone() for p in self.m.parameters()])

    for mu in (1, 2):
        trained = copy.deepcopy(model)
        grpo_update(trained, None, torch.optim.SGD(trained.parameters(), lr=0.5), batch, advantages,
                    GRPOConfig(group_size=G, mu=mu), scheduler=Snapshot(trained))
    assert len(after_first) == 3
    for a, b in zip(after_first[0], after_first[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_model_needed_exactly_when_beta_positive():
    model = _model()
    batch = _batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reference model"):
        grpo_update(model, None, opt, batch, torch.zeros(len(batch)), GRPOConfig(group_size=G, beta=0.1))
    with pytest.raises(ValueError, match="reference model"):
        grpo_update(model, _model(), opt, batch, torch.zeros(len(batch)), GRPOConfig(group_size=G))
    metrics = grpo_update(model, copy.deepcopy(model), opt, batch, torch.zeros(len(batch)),
                          GRPOConfig(group_size=G, beta=0.1))
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step
    with pytest.raises(ValueError, match="GRPOConfig.aggregation"):
        GRPOConfig(aggregation="sum")


def _rank_worker(work_dir: str):
    """One torchrun rank (this file run as a script): this rank's half of the saved batch (whole groups),
    through DDP, for each saved config; writes its parameters and advantages."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, batch, advantages, configs = torch.load(os.path.join(work_dir, "inputs.pt"), weights_only=False)
    rows = slice(0, len(batch) // 2) if rank == 0 else slice(len(batch) // 2, len(batch))
    shard = batch.select(rows)
    for name, cfg in configs.items():
        trained = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(trained)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1.0)
        if name == "step":  # this rank's rewards -> advantages (batch std over both ranks) -> update
            shard_advantages = sequence_weights(shard, _rewards(shard), cfg)[0]
            grpo_step(ddp, None, optimizer, shard, [EVEN], cfg)
        else:
            shard_advantages = advantages[rows]
            grpo_update(ddp, None, optimizer, shard, shard_advantages, cfg)
        params = [p.detach() for p in trained.parameters()]
        torch.save((params, shard_advantages), os.path.join(work_dir, f"{name}{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank():
    """torchrun, 2 ranks of DDP (gloo), each holding whole groups: global normaliser and world-size scaling
    give the 1-process update, for the per-sequence ("grpo") and the token-level ("dapo") normalisers;
    and grpo_step from rewards ("step": batch-std advantages, Dr. GRPO sum) gives the 1-process
    advantages and update."""
    model = _model(5)
    batch = _batch(model, seed=5)
    advantages = torch.randn(len(batch))
    common = dict(group_size=G, micro_batch_size=3, max_grad_norm=0)
    configs = {"grpo": GRPOConfig(aggregation="grpo", **common), "dapo": GRPOConfig(aggregation="dapo", **common),
               "step": GRPOConfig(aggregation="dr_grpo", advantage="batch_std", **common)}
    half = len(batch) // 2
    assert batch.completion_mask[:half].sum() != batch.completion_mask[half:].sum()  # ranks hold unequal tokens
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((model, batch, advantages, configs), os.path.join(tmp, "inputs.pt"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, tmp]
        result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = {name: [torch.load(os.path.join(tmp, f"{name}{r}.pt")) for r in range(2)] for name in configs}
    for name, cfg in configs.items():
        single = copy.deepcopy(model)
        optimizer = torch.optim.SGD(single.parameters(), lr=1.0)
        if name == "step":
            single_advantages = sequence_weights(batch, _rewards(batch), cfg)[0]
            grpo_step(single, None, optimizer, batch, [EVEN], cfg)
        else:
            single_advantages = advantages
            grpo_update(single, None, optimizer, batch, advantages, cfg)
        (params0, adv0), (params1, adv1) = ranks[name]
        torch.testing.assert_close(torch.cat([adv0, adv1]), single_advantages, rtol=1e-6, atol=1e-6)
        for p, p0, p1 in zip(single.parameters(), params0, params1):
            torch.testing.assert_close(p0, p1)
            torch.testing.assert_close(p0, p.detach(), rtol=1e-4, atol=1e-6)


def _learn_toy_task() -> list[float]:
    """Mean reward per step of GRPO on the toy task below, stopping once it exceeds 0.9 (at most 25 steps)."""
    model = _model(0)
    ref = copy.deepcopy(model).eval()
    cfg = GRPOConfig(group_size=8, max_new_tokens=2, eps_high=0.28, beta=0.01, aggregation="grpo", mu=2,
                     filter_zero_std=True, micro_batch_size=64)
    reward = RewardFn("answer_is_7", lambda completions, refs: [float(c.tokens[:1] == [7]) for c in completions])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    prompts = _prompts(8 * 25, seed=7)
    history = []
    for batch in rollout_batches(model, prompts, [None] * len(prompts), cfg.sampling_params(), STOP_IDS, prompts_per_step=8):
        history.append(grpo_step(model, ref, opt, batch, [reward], cfg)["reward"])
        if history[-1] > 0.9:
            break
    return history


def test_tiny_model_learns_toy_task():
    """Verifiable toy task: answer every prompt with token 7. Chance is ~1/16; GRPO must take the mean
    reward from < 0.3 to > 0.9 within 25 steps, with mu = 2, a k3 KL penalty, clip-higher, per-sequence
    aggregation and zero-std filtering all switched on; a second run gives the same rewards exactly."""
    history = _learn_toy_task()
    assert history[0] < 0.3
    assert history[-1] > 0.9, history
    assert _learn_toy_task() == history  # deterministic: seeded sampling, no global RNG


def test_config_builds_weighted_reward_fns():
    from model.generate import Completion
    from rl.rewards import compute_rewards

    def completion(text, n):
        return Completion(0, 0, list(range(n)), [0.0] * n, [0.0] * n, "stop", text)
    cfg = GRPOConfig(max_new_tokens=10, format_pattern=r"#### \d+", format_weight=0.5, overlong_buffer=4)
    fns = cfg.reward_fns("gsm8k")
    assert [(f.name, f.weight) for f in fns] == [("correct", 1.0), ("format", 0.5), ("overlong", 1.0)]
    total, per_fn = compute_rewards(fns, [completion("3 + 15 = 18\n#### 18", 9), completion("#### 17", 2)], ["18", "18"])
    # Row 0: correct 1, format 1, overlong (6 - 9) / 4 = -0.75 -> 1 + 0.5 - 0.75. Row 1: 0 + 0.5 + 0.
    torch.testing.assert_close(total, torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(per_fn["correct"], torch.tensor([1.0, 0.0]))
    assert [f.name for f in GRPOConfig().reward_fns("gsm8k")] == ["correct"]
    with pytest.raises(ValueError, match="format_pattern"):
        GRPOConfig(format_weight=0.1)


@pytest.mark.parametrize("beta", [0.1, 0.0])  # the per-token path, and the fused on-policy path (mu = 1, beta = 0)
def test_update_never_materialises_the_full_logits(beta):
    """Log-probs, reference log-probs (beta > 0), entropy and their backward go through the chunked head:
    no tensor ever holds more than chunk_size rows of vocabulary-wide values (here V = 97, a size no
    other dimension has; the hidden size 32 < chunk_size, so a transposed lm_head view stays under it)."""
    model = Transformer(replace(TOY, vocab_size=97))
    params = GRPOConfig(group_size=G, max_new_tokens=6).sampling_params()
    batch = rollout(model, _prompts(8, seed=8), [None] * 8, params, STOP_IDS)
    chunk = 40
    assert batch.completion_mask.numel() > 3 * chunk  # full logits would be [B * C, V]
    cfg = GRPOConfig(group_size=G, max_new_tokens=6, chunk_size=chunk, micro_batch_size=len(batch), beta=beta)
    widest = WidestVocabTensor(97)
    with widest:
        grpo_update(model, copy.deepcopy(model) if beta else None, torch.optim.SGD(model.parameters(), lr=0.1),
                    batch, torch.randn(len(batch)), cfg)
    assert 0 < widest.rows <= chunk


def test_bf16_autocast_update_matches_fp32():
    """The mixed-precision path (forward under autocast, fp32 log-probs and loss) gives ~ the fp32 update."""
    model = _model(6)
    batch = _batch(model, seed=6)
    advantages = torch.randn(len(batch))
    cfg = GRPOConfig(group_size=G, micro_batch_size=5, max_grad_norm=0)
    fp32 = torch.cat([d.flatten() for d in _sgd_delta(model, batch, advantages, cfg)[0]])
    trained = copy.deepcopy(model)
    metrics = grpo_update(trained, None, torch.optim.SGD(trained.parameters(), lr=1.0), batch, advantages, cfg,
                          forward_context=lambda: torch.autocast("cpu", torch.bfloat16))
    bf16 = torch.cat([(p0 - p1).detach().flatten() for p0, p1 in zip(model.parameters(), trained.parameters())])
    assert torch.isfinite(torch.tensor(list(metrics.values()))).all()
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99


if __name__ == "__main__":  # a rank of test_two_ranks_equal_one_rank, under torchrun
    _rank_worker(sys.argv[1])
