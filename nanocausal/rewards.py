"""Scoring of model responses: the official CauGym rule and the RL reward built on it.

Official rule (../shared/data/caugym/README.md, from eval/sample_evaluate.py of
OpenCausaLab/CauGym at commit 63452d4):
  - gold LACK_CONDITION: the response is correct iff the substring "LACK_CONDITION" occurs in it;
  - otherwise remove all whitespace from the response, take every span that starts with
    {"ANSWER": or {"PROB": (capital keys, as the prompt asks) and ends at the next "}",
    lower-case it and parse it as JSON; the response is correct iff ANY parsed "prob" lies
    within 0.0005 of the gold PROB. The Yes/No field is not scored. Spans that do not parse
    (or whose prob is not a number) are skipped.

RL reward (ours):  reward = correct + format_weight * format_ok, where format_ok says the
response ENDS with one well-formed answer (an answer JSON of the right shape, or
LACK_CONDITION when that is the gold answer). The official rule accepts any JSON anywhere, which
RL learns to exploit by printing several guesses; strict=True scores only the LAST answer
JSON of the response (or, for LACK_CONDITION, only a response whose last answer is it).
"""
import json
import re

LACK = "LACK_CONDITION"
TOLERANCE = 0.0005
_SPAN = re.compile(r'\{"(?:ANSWER|PROB)":[^}]*\}')


def answer_spans(response):
    """Every parsed answer JSON of the response, in order (lower-cased keys), per the official
    rule: whitespace removed, spans from {"ANSWER": or {"PROB": to the next }."""
    out = []
    for span in _SPAN.findall(re.sub(r"\s+", "", response)):
        try:
            parsed = json.loads(span.lower())
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            out.append(parsed)
    return out


def _prob(parsed):
    try:
        value = float(parsed.get("prob"))
    except (TypeError, ValueError):
        return None
    return value if value == value else None   # NaN never matches


def gold_prob(answer):
    return float(json.loads(answer)["PROB"])


def is_correct(response, answer):
    """The official CauGym scoring rule (see module docstring): True iff the response is
    counted correct for the gold `answer` (an answer JSON string or LACK_CONDITION)."""
    if answer.strip() == LACK:
        return LACK in response
    gold = gold_prob(answer)
    return any(p is not None and abs(p - gold) <= TOLERANCE + 1e-9 for p in map(_prob, answer_spans(response)))


def _last_answer(response):
    """('lack', None) | ('json', parsed) | (None, None): the final answer the response gives,
    the one that comes last in the text."""
    squeezed = re.sub(r"\s+", "", response)
    spans = list(_SPAN.finditer(squeezed))
    lack_at = squeezed.rfind(LACK)
    if lack_at >= 0 and (not spans or lack_at > spans[-1].start()):
        return "lack", None
    for span in reversed(spans):
        try:
            parsed = json.loads(span.group(0).lower())
        except json.JSONDecodeError:
            return None, None
        return ("json", parsed) if isinstance(parsed, dict) else (None, None)
    return None, None


def format_ok(response, answer=None):
    """1.0 when the response ends with a well-formed final answer: nothing but whitespace after
    it, an answer JSON whose "prob" is a number (with an "answer" of yes/no when present), or
    LACK_CONDITION; else 0.0. With the gold `answer` given, the final answer must have its form
    (the same JSON keys, or LACK_CONDITION)."""
    kind, parsed = _last_answer(response)
    tail = re.sub(r"\s+", "", response)
    if kind == "lack":
        if answer is not None and answer.strip() != LACK:
            return 0.0
        return float(tail.endswith(LACK) or tail.endswith(LACK + '"') or tail.endswith(LACK + '"}'))
    if kind != "json" or not tail.endswith("}") or _prob(parsed) is None or \
            answer is not None and answer.strip() == LACK:
        return 0.0
    if "answer" in parsed and str(parsed["answer"]) not in ("yes", "no"):
        return 0.0
    if answer is not None and answer.strip() != LACK:
        return float(set(parsed) == {k.lower() for k in json.loads(answer)})
    return 1.0


def reward(response, answer, format_weight=0.1, strict=False):
    """RL reward = correct + format_weight * format_ok (see module docstring). strict=True
    judges correctness on the last answer of the response only."""
    if strict:
        kind, parsed = _last_answer(response)
        if answer.strip() == LACK:
            correct = kind == "lack"
        else:
            p = _prob(parsed) if kind == "json" else None
            correct = p is not None and abs(p - gold_prob(answer)) <= TOLERANCE + 1e-9
    else:
        correct = is_correct(response, answer)
    return float(correct) + format_weight * format_ok(response, answer)
