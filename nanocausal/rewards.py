"""The RL reward, built on the official CauGym scoring rule (nanocausal.caugym.is_correct).

    reward = correct + format_weight * format_ok

The official rule accepts any answer JSON anywhere in the reply, which RL learns to exploit by
printing several guesses: format_ok asks that the response END with one well-formed answer, and
strict=True judges correctness on the LAST answer only.

Several rewards can be combined instead (`parse_rewards`, train_rl.py --rewards / --reward-weights);
the official correctness rule stays the evaluation metric whatever the training reward.
"""
import json
import math
import re

from nanocausal.caugym import ANSWER_SPAN, LACK, answer_prob, answer_spans, is_correct, prob_matches


def last_answer(response):
    """('lack', None) | ('json', parsed) | (None, None): the answer that comes last in the response
    (a last answer JSON that does not parse is no answer)."""
    squeezed = re.sub(r"\s+", "", response)
    spans = list(ANSWER_SPAN.finditer(squeezed))
    if squeezed.rfind(LACK) > (spans[-1].start() if spans else -1):
        return "lack", None
    parsed = answer_spans(spans[-1].group(0)) if spans else []  # the official rule's parse of that span
    return ("json", parsed[0]) if parsed else (None, None)


def format_ok(response, answer):
    """1.0 when the response ends with a well-formed final answer of the gold `answer`'s form:
    nothing but whitespace after it, and LACK_CONDITION for a gold LACK_CONDITION, else an answer
    JSON with the gold's keys whose "prob" is a number (and whose "answer", if any, is yes/no);
    else 0.0."""
    kind, parsed = last_answer(response)
    tail = re.sub(r"\s+", "", response)
    if answer.strip() == LACK:
        return float(kind == "lack" and tail.endswith((LACK, LACK + '"', LACK + '"}')))
    if kind != "json" or not tail.endswith("}") or answer_prob(parsed) is None:
        return 0.0
    if "answer" in parsed and str(parsed["answer"]) not in ("yes", "no"):
        return 0.0
    return float(set(parsed) == {k.lower() for k in json.loads(answer)})


def reward(response, answer, format_weight=0.1, strict=False):
    """correct + format_weight * format_ok; strict=True: correct on the last answer only."""
    if strict:
        kind, parsed = last_answer(response)
        if answer.strip() == LACK:
            correct = kind == "lack"
        else:
            correct = kind == "json" and prob_matches(answer_prob(parsed), answer)
    else:
        correct = is_correct(response, answer)
    return float(correct) + format_weight * format_ok(response, answer)

# -----------------------------------------------------------------------------
# Several rewards, by name: --rewards correct,format --reward-weights 1,0.1


def lack_condition(response, answer):
    """1.0 when the response's final answer says LACK_CONDITION exactly when the gold answer is
    LACK_CONDITION (it recognises a problem that cannot be solved, and only such a problem)."""
    return float((last_answer(response)[0] == "lack") == (answer.strip() == LACK))


def length(response, answer):
    """Minus the response's length in thousands of characters: a mild push towards short replies
    (the overlong penalty, --overlong-buffer, is the token-budget one)."""
    return -len(response) / 1000


REWARDS = {
    "correct": lambda response, answer: float(is_correct(response, answer)),  # the official rule
    "correct_strict": lambda response, answer: reward(response, answer, 0.0, strict=True),  # the last answer only
    "format": format_ok,
    "lack_condition": lack_condition,
    "length": length,
}


def parse_rewards(names, weights=None):
    """'correct,format' and '1,0.1' -> [(name, function, weight)]; weights default to 1 each. A
    reward is a plain function (response, answer) -> float; add yours to REWARDS."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARDS]
    if not names or unknown:
        raise ValueError(f"--rewards {','.join(names)}: unknown {', '.join(unknown) or 'empty list'}; expected a "
                         f"comma-separated list of {', '.join(REWARDS)}")
    if weights is None:
        values = [1.0] * len(names)
    else:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            values = []
        if len(values) != len(names) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"--reward-weights {weights}: expected {len(names)} comma-separated finite numbers, one "
                             f"per reward of --rewards {','.join(names)}")
    return [(name, REWARDS[name], weight) for name, weight in zip(names, values)]
