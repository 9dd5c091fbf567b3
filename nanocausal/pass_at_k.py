"""pass@k and maj@k: whether a model's n samples of a problem cover the answer (pass@k) or agree on
it (maj@k), beside the accuracy (= pass@1). A run's curve of both shows whether RL sharpens the
distribution (pass@1 rises to meet pass@k) or widens what it can find (pass@k rises too). Used by
eval.py (--num-samples > 1) and the trainers' periodic evaluation (--eval-samples > 1)."""
import math
from collections import defaultdict

from nanocausal import caugym
from nanocausal.rewards import last_answer


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k (at least one of k samples correct) from n samples, c correct:

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (the product form never builds the large binomials). pass@1 = c / n; pass@n = [c > 0]. Drawing
    k of the n samples without replacement is what makes it unbiased (1 - (1 - c/n)^k is not).
    Source: Chen et al. 2021 (Codex), arXiv 2107.03374, Sec. 2.1."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def voted_answer(response):
    """The answer a sample votes for in maj@k: its final answer (rewards.last_answer), "lack" or
    the PROB rounded to 4 decimals (the official tolerance is 0.0005), or None (no vote)."""
    kind, parsed = last_answer(response)
    if kind == "lack":
        return "lack"
    prob = caugym.answer_prob(parsed) if kind == "json" else None
    return None if prob is None else round(prob, 4)


def majority_correct(records):
    """maj@k of one problem's samples: the most voted answer (ties: the one voted first) scored by
    the official tolerance; wrong when no sample gives an answer."""
    votes = [v for v in (voted_answer(r["response"]) for r in records) if v is not None]
    if not votes:
        return False
    winner = max(dict.fromkeys(votes), key=votes.count)
    answer = records[0]["answer"]
    if winner == "lack":
        return answer.strip() == caugym.LACK
    return answer.strip() != caugym.LACK and caugym.prob_matches(winner, answer)


def pass_and_majority(records, k):
    """{type: {"pass@1", "pass@k", "maj@k"}} plus "overall", each a mean over problems, from the
    n >= k samples of each problem (records grouped by key; CaLM's unscored samples left out).
    With the same n for every problem, pass@1 is the accuracy of `accuracy`."""
    samples = defaultdict(list)
    for r in records:
        if r["correct"] is not None:
            samples[r["key"]].append(r)
    per_group = defaultdict(list)  # group -> the values of each of its problems
    for problem in samples.values():
        n, c = len(problem), sum(bool(r["correct"]) for r in problem)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem; {problem[0]['key']} has {n}")
        values = {"pass@1": c / n, f"pass@{k}": pass_at_k(n, c, k), f"maj@{k}": float(majority_correct(problem[:k]))}
        for group in (problem[0].get("type"), "overall"):
            per_group[group].append(values)
    return {group: {name: sum(v[name] for v in rows) / len(rows) for name in rows[0]}
            for group, rows in per_group.items()}
