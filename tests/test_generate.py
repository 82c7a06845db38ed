"""model/generate.py against independent references: full re-forward decoding without a cache, a naive
per-token top-k / top-p distribution, empirical frequencies, and plain-text stop-string search."""
import math

import pytest
import torch

from model.config import ModelConfig
from model.generate import SamplingParams, generate
from model.transformer import Transformer

VOCAB = 97


def tiny_model(model_type="qwen2", seed=0, logit_scale=1.0) -> Transformer:
    config = ModelConfig(
        model_type=model_type, vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=10_000.0,
        max_position_embeddings=256, tie_word_embeddings=model_type == "qwen2",
        attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std=0.1)  # peakier than 0.02: clear argmax gaps and non-flat distributions
    with torch.no_grad():
        model.norm.weight.mul_(logit_scale)
    return model.eval()


def ragged_prompts(lengths=(5, 1, 9, 3), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def full_logits(model, prompt, completion) -> torch.Tensor:
    """Next-token logits [len(completion), V] for each completion token, by one forward without cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0]  # (T, V)
    return logits[len(prompt) - 1:len(prompt) + len(completion) - 1]


def greedy_reference(model, prompt, steps) -> list[int]:
    """Greedy decoding by re-running the whole sequence every step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def sampling_distribution(logits: torch.Tensor, temperature, top_k, top_p) -> dict[int, float]:
    """Naive reference: {token: log-prob} after temperature, top-k, then the nucleus, token by token."""
    z = (logits.double() / temperature).tolist()
    ranked = sorted(range(len(z)), key=lambda i: -z[i])
    kept = ranked[:top_k] if top_k else ranked
    log_norm = math.log(sum(math.exp(z[i]) for i in kept))
    nucleus, mass = [], 0.0
    for i in kept:  # keep tokens while the mass of the more likely ones is below top_p
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += math.exp(z[i] - log_norm)
    log_norm = math.log(sum(math.exp(z[i]) for i in nucleus))
    return {i: z[i] - log_norm for i in nucleus}


class CharTokenizer:
    """Token i decodes to 1-3 copies of a letter; token 1 decodes to nothing (like a partial byte)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if i == 1 else "abcdefghij"[i % 10] * (1 + i % 3) for i in ids)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_greedy_equals_full_reforward(model_type):
    model = tiny_model(model_type)
    prompts = ragged_prompts()
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0), stop_ids=[])
    for c, prompt in zip(out, prompts):
        assert c.tokens == greedy_reference(model, prompt, 12)
        assert c.finish_reason == "length" and c.logprobs == [0.0] * 12


def test_logprobs_match_full_forward_and_naive_distribution():
    model = tiny_model(logit_scale=4.0)
    prompts = ragged_prompts()
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, n=2, seed=3)
    for c in generate(model, prompts, params, stop_ids=[]):
        logits = full_logits(model, prompts[c.prompt_index], c.tokens)  # (10, V)
        expected_t1 = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs_t1), expected_t1, atol=1e-5, rtol=0)
        for step, token in enumerate(c.tokens):
            dist = sampling_distribution(logits[step], params.temperature, params.top_k, params.top_p)
            assert token in dist  # never outside the top-k / nucleus
            assert c.logprobs[step] == pytest.approx(dist[token], abs=1e-5)


def test_ragged_batch_equals_each_prompt_alone():
    model = tiny_model()
    prompts = ragged_prompts()
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    together = generate(model, prompts, greedy, stop_ids=[])
    for c, prompt in zip(together, prompts):
        assert c.tokens == generate(model, [prompt], greedy, stop_ids=[])[0].tokens
    # Sampling: each completion has its own random stream, so grouping prompts changes nothing.
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=5)
    runs = [generate(model, prompts, sampled, stop_ids=[], batch_size=b) for b in (None, 1, 3)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]] == [c.tokens for c in runs[2]]
    assert runs[0][0].logprobs == pytest.approx(runs[1][0].logprobs, abs=1e-5)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model(logit_scale=4.0)
    prompts = ragged_prompts()
    greedy = [c.tokens for c in generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0), [])]
    for params in (SamplingParams(max_new_tokens=10, top_k=1, n=2), SamplingParams(max_new_tokens=10, top_p=1e-6, n=2)):
        out = generate(model, prompts, params, stop_ids=[])
        assert [c.tokens for c in out] == [t for t in greedy for _ in range(2)]
        assert all(lp == pytest.approx(0.0, abs=1e-6) for c in out for lp in c.logprobs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 12, 0.9)])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
    model = tiny_model(logit_scale=3.0)
    prompt, draws = [3, 14, 15], 6000
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, n=draws, seed=11)
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in generate(model, [prompt], params, [])]), minlength=VOCAB)
    logits = full_logits(model, prompt, [0])[0]  # (V,)
    dist = sampling_distribution(logits, temperature, top_k, top_p)
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[list(dist)] = torch.tensor(list(dist.values()), dtype=torch.float64).exp() * draws
    assert counts[expected == 0].sum() == 0  # nothing outside the support

    def chi_square(expected):  # pool the cells expected below 5 into one
        big = expected >= 5
        obs = torch.cat([counts[big].double(), counts[~big].sum().double()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        return float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()), int(big.sum())

    stat, df = chi_square(expected)
    assert stat < df + 5 * math.sqrt(2 * df)  # ~ the 0.9999 quantile of chi2(df)
    plain = logits.double().softmax(-1) * draws  # the test has power: untempered frequencies are rejected
    assert chi_square(plain)[0] > 10 * (df + 5 * math.sqrt(2 * df))


def test_stop_ids_and_length():
    model = tiny_model()
    prompts = ragged_prompts()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=2)
    free = generate(model, prompts, params, stop_ids=[])
    assert all(c.finish_reason == "length" and len(c.tokens) == 16 for c in free)
    stop = free[0].tokens[5]
    batch_rows = []
    handle = model.register_forward_pre_hook(lambda module, args: batch_rows.append(args[0].shape[0]))
    try:
        stopped = generate(model, prompts, params, stop_ids=[stop, VOCAB - 1])
    finally:
        handle.remove()
    assert min(batch_rows) < len(prompts)  # finished rows left the batch ...
    for c, f in zip(stopped, free):
        cut = next((i + 1 for i, t in enumerate(f.tokens) if t in (stop, VOCAB - 1)), None)
        assert c.tokens == f.tokens[:cut]  # ... and the others went on unchanged
        assert c.logprobs_t1 == pytest.approx(f.logprobs_t1[:cut], abs=1e-5)
        assert c.finish_reason == ("length" if cut is None else "stop")
    assert stopped[0].finish_reason == "stop" and stopped[0].tokens[-1] == stop


def test_stop_strings_cut_text_where_plain_search_finds_them():
    model = tiny_model()
    tokenizer = CharTokenizer()
    prompts = ragged_prompts()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4)
    free = generate(model, prompts, params, stop_ids=[], tokenizer=tokenizer)
    stop_strings = (free[0].text[6:10], free[2].text[3:5])
    stopped = generate(model, prompts, SamplingParams(**{**params.__dict__, "stop_strings": stop_strings}),
                       stop_ids=[], tokenizer=tokenizer)
    for c, f in zip(stopped, free):
        # Reference: the first prefix of the free-running completion whose full decode holds a stop string.
        cut = next((t for t in range(1, 21) if any(s in tokenizer.decode(f.tokens[:t]) for s in stop_strings)), None)
        assert c.tokens == f.tokens[:cut]
        assert c.finish_reason == ("length" if cut is None else "stop")
        text = tokenizer.decode(c.tokens)
        assert c.text == text[:min([text.find(s) for s in stop_strings if s in text], default=len(text))]
    assert stopped[0].finish_reason == "stop"


def test_text_drops_the_stop_token():
    model = tiny_model()
    prompts = ragged_prompts()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=6)
    free = generate(model, prompts, params, stop_ids=[])
    stop = free[1].tokens[4]
    c = generate(model, prompts, params, stop_ids=[stop], tokenizer=CharTokenizer())[1]
    assert c.finish_reason == "stop" and c.tokens[-1] == stop
    assert c.text == CharTokenizer().decode(c.tokens[:-1])


def test_n_samples_share_one_prefill_and_differ():
    model = tiny_model(logit_scale=2.0)
    prompts = ragged_prompts((4, 7, 2))
    shapes = []
    handle = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        out = generate(model, prompts, SamplingParams(max_new_tokens=6, n=4, seed=1), stop_ids=[])
    finally:
        handle.remove()
    assert shapes == [(3, 7)] + [(12, 1)] * 5  # one prefill of the 3 prompts, then 12-row decode steps
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(4)]
    for i in range(3):
        assert len({tuple(c.tokens) for c in out[4 * i:4 * i + 4]}) > 1


def test_seeded_and_reproducible():
    model = tiny_model()
    prompts = ragged_prompts()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=30, n=2, seed=7)
    first, again = (generate(model, prompts, params, stop_ids=[]) for _ in range(2))
    assert [(c.tokens, c.logprobs) for c in first] == [(c.tokens, c.logprobs) for c in again]
    other = generate(model, prompts, SamplingParams(**{**params.__dict__, "seed": 8}), stop_ids=[])
    assert [c.tokens for c in first] != [c.tokens for c in other]


def test_restores_training_mode_and_runs_in_eval():
    model = tiny_model().train()
    prompts = ragged_prompts()
    out = generate(model, prompts, SamplingParams(max_new_tokens=4, temperature=0), stop_ids=[])
    assert model.training
    assert [c.tokens for c in out] == [greedy_reference(model.eval(), p, 4) for p in prompts]


def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1, 2]], SamplingParams(stop_strings=("x",)), stop_ids=[])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], SamplingParams(), stop_ids=[])
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        generate(model, [[1, VOCAB]], SamplingParams(), stop_ids=[])


def test_runs_under_bf16_autocast():
    model = tiny_model()
    prompts = ragged_prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=9), stop_ids=[])
        for c in out:
            logits = full_logits(model, prompts[c.prompt_index], c.tokens).float()  # (6, V)
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(c.logprobs_t1), expected, atol=0.05, rtol=0)  # bf16 matmuls
