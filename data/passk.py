"""pass@k and maj@k over n sampled completions per problem.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): the chance
that at least one of k completions drawn without replacement from the n generated is correct,
given c of the n are:
    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)
The product form avoids the huge binomials. It is unbiased, unlike 1 - (1 - c/n)^k.

maj@k (self-consistency, Wang et al. 2022): take the first k completions, vote on their extracted
answers (None does not vote), and score the winning answer. Tie rule: among the answers with the
most votes, the one that appears first wins, so the result never depends on set/dict ordering.
Votes compare extracted strings exactly: the gsm8k grader canonicalises numbers (1,000 -> 1000),
the math grader does not, so "0.5" and "\\frac{1}{2}" are separate candidates there.
"""
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct out of n samples (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def maj_at_k(extracted: list[str | None], scores: list[float], k: int) -> float:
    """Score of the majority answer among the first k samples (0.0 when none has an answer)."""
    if not 1 <= k <= len(extracted) or len(extracted) != len(scores):
        raise ValueError(f"maj@k needs 1 <= k <= n and one score per sample, got k={k}, "
                         f"{len(extracted)} answers, {len(scores)} scores")
    votes = Counter(a for a in extracted[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in extracted[:k] if votes.get(a) == top)  # first-seen among the tied
    return scores[extracted.index(winner)]


def report_ks(n: int) -> list[int]:
    """The k a printed table shows for n samples: powers of two below n, and n itself
    (summary.json holds every k <= n)."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})
