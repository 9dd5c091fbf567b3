"""What the CauGym benchmark fixes, in one place: its seven tasks, its test variants, the user
message the official protocol sends, the sampling settings it uses, and its scoring rule.

Source: the official protocol of OpenCausaLab/CauGym at commit 63452d4 (eval/sample_generate.py
and eval/sample_evaluate.py), as ../shared/data/caugym/README.md describes it.

  - user message = problem + "\\n" + "Let's think step by step."; items of the insufficient set
    (gold LACK_CONDITION) also get 'If the condition is not enough to solve the question, output
    "LACK_CONDITION" as final answer.' It is rendered with the model's own chat template.
  - 5 samples per problem at temperature 0.6, top_p 0.95, at most 8192 new tokens.
  - scoring, gold LACK_CONDITION: correct iff the substring "LACK_CONDITION" occurs in the reply.
  - scoring, otherwise: remove all whitespace from the reply, take every span that starts with
    {"ANSWER": or {"PROB": (capital keys, as the prompt asks) and ends at the next "}", lower-case
    it and parse it as JSON; the reply is correct iff ANY parsed "prob" lies within 0.0005 of the
    gold PROB. The Yes/No field is not scored; spans that do not parse (or whose prob is not a
    number) are skipped.
  - accuracy = correct samples / all samples, per task (Type) and overall.

nanocausal.evaluation runs this protocol on a model; nanocausal.rewards builds the RL reward on
`is_correct`.
"""
import json
import re

TASKS = ("ATE", "CDE", "ETT", "NDE", "NIE", "PN", "PS")
VARIANTS = ("base", "omitted", "rephrased", "deconfounding", "redundant", "insufficient")
LACK = "LACK_CONDITION"  # the gold answer when the problem does not give what the question needs
STEP = "Let's think step by step."
LACK_HINT = 'If the condition is not enough to solve the question, output "LACK_CONDITION" as final answer.'
OFFICIAL_SAMPLING = dict(num_samples=5, temperature=0.6, top_p=0.95, max_new_tokens=8192)
TOLERANCE = 0.0005  # a PROB within this of the gold PROB is correct
ANSWER_SPAN = re.compile(r'\{"(?:ANSWER|PROB)":[^}]*\}')


def official_prompt(problem, variant="base", lack_hint=None):
    """The official user message (module docstring); lack_hint overrides whether it has the hint."""
    hint = variant == "insufficient" if lack_hint is None else lack_hint
    return problem + "\n" + STEP + (" " + LACK_HINT if hint else "")


def answer_spans(response):
    """Every parsed answer JSON of the response (the official rule's spans), in order, keys lower-cased."""
    out = []
    for span in ANSWER_SPAN.findall(re.sub(r"\s+", "", response)):
        try:
            out.append(json.loads(span.lower()))  # a span is "{...}": whatever parses is an object
        except json.JSONDecodeError:
            pass
    return out


def answer_prob(parsed):
    """The "prob" of a parsed answer JSON as a float; None when absent, not a number, or NaN."""
    try:
        value = float(parsed.get("prob"))
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN never matches


def gold_prob(answer):
    return float(json.loads(answer)["PROB"])


def prob_matches(prob, answer):
    """prob (a float or None) is within the official tolerance of the gold answer's PROB. The 1e-9
    absorbs float rounding: 0.1239 against gold 0.1234 is |0.0005| on paper."""
    return prob is not None and abs(prob - gold_prob(answer)) <= TOLERANCE + 1e-9


def is_correct(response, answer):
    """The official CauGym scoring rule (module docstring): True iff the response counts as
    correct for the gold `answer` (an answer JSON string, or LACK_CONDITION)."""
    if answer.strip() == LACK:
        return LACK in response
    return any(prob_matches(p, answer) for p in map(answer_prob, answer_spans(response)))
