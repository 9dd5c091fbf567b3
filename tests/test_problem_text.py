"""nanocausal.problem_text: the solver on a hand-written problem, against every official label
(base, deconfounding, insufficient, omitted, the official training prompts), and on malformed text."""
import json
import re
from pathlib import Path

import pytest

from nanocausal.caugym import LACK, is_correct
from nanocausal.problem_text import PROVIDE, solve

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "caugym"


def official(name):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} (the official CauGym files in the team's shared folder) is not present")
    path = DATA / name
    return json.load(open(path)) if name.endswith(".json") else [json.loads(ln) for ln in open(path)]


def test_solve_hand_written_problem():
    text = ("Input Info: Imagine a self-contained, hypothetical world with only the following conditions, and "
            "without any unmentioned factors or causal relationships: Rain has a direct effect on mud. Wind has a "
            "direct effect on mud.\nFor those with rain being low, the probability of mud being high is 0.2000. For "
            "those with rain being high, the probability of mud being high is 0.7500. \nInstruction: Consider the "
            "average treatment effect (ATE) of rain on mud.\nQuestion: If rain is changed to be low, will mud be "
            "more likely to be low?\n" + PROVIDE)
    assert solve(text) == '{"ANSWER": "Yes", "PROB": "0.5500"}'          # (1 - 0.2) - (1 - 0.75)
    assert solve(text.replace("For those with rain being high, the probability of mud being high is 0.7500. ",
                              "")) == LACK
    assert solve(text.replace("Rain has a direct effect on mud. ", "Mud has a direct effect on rain. ")) \
        == '{"ANSWER": "No", "PROB": "0.0000"}'                           # no path rain -> mud

# ----------------------------------------------------------------------------- official data
def score(items, key="problem"):
    """Accuracy of solve() by the official rule, per Type and under "all"."""
    correct = {}
    for it in items:
        try:
            ok = is_correct(solve(it[key]), it["answer"])
        except ValueError:
            ok = False
        for group in (it.get("Type"), "all"):
            correct.setdefault(group, []).append(ok)
    return {t: sum(v) / len(v) for t, v in correct.items() if t}


def test_solve_official_base_deconfounding_insufficient():
    assert set(score(official("base.json")).values()) == {1.0}
    deconf = score(official("deconfounding.json"))
    assert all(deconf[t] == 1.0 for t in ("ATE", "CDE", "ETT", "NDE", "NIE")), deconf
    assert (deconf["PN"] + deconf["PS"]) / 2 >= 0.90, deconf
    insufficient = official("insufficient.json")
    assert all(solve(it["problem"]) == LACK for it in insufficient)


def test_solve_official_training_prompts():
    assert score(official("train_online_rl.jsonl"), key="prompt")["all"] >= 0.97


def test_solve_official_omitted_items_that_kept_the_sentences():
    base = official("base.json")
    kept = []
    for it, ref in zip(official("omitted.json"), base):
        lines = ref["problem"].split("\n")
        sentences = [s for ln in lines if not ln.startswith("Instruction:")
                     for s in re.split(r"(?<=\.)\s+", ln.split("relationships:")[-1]) if s.strip()]
        if all(s.strip() in it["problem"] for s in sentences):
            kept.append(it)
    assert len(kept) >= 59
    assert score(kept)["all"] >= 0.99
    # the rewrites it cannot read raise ValueError: never a wrong answer
    for it in official("omitted.json")[:120]:
        try:
            assert is_correct(solve(it["problem"]), it["answer"])
        except ValueError:
            pass

# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text", [
    "hello", "Input Info: no colon here",
    "Input Info: World: A has a direct effect on b.\nQuestion: If c is changed to be low, will b be more likely "
    "to be high?",
    "Input Info: World: A has a direct effect on b.\nThe probability of a being low is 0.5.\nQuestion: What "
    "now?",
    "Input Info: World: A flies over b.\nQuestion: If a is changed to be low, will b be more likely to be high?",
])
def test_solve_rejects_malformed_problems(text):
    with pytest.raises(ValueError):
        solve(text)


def test_an_unreadable_sentence_is_skipped_and_the_rest_answers(shared_dir):
    """The official redundant set has an item with a truncated sentence; the solver answers from
    the statements it can read, and names the sentence when the answer would have needed it."""
    item = json.loads((shared_dir / "data" / "caugym" / "base.json").read_text())[0]
    lines = item["problem"].split("\n")
    at = next(i for i, line in enumerate(lines) if " is 0." in line)
    broken = lines[:at] + [lines[at] + " lightning) being necessary (D=1) is 0.4064."] + lines[at + 1:]
    assert solve("\n".join(broken)) == solve(item["problem"]) and is_correct(solve(item["problem"]), item["answer"])
    # The same sentence in place of the statements: nothing to answer from, and the error says why.
    gutted = lines[:at] + ["lightning) being necessary (D=1) is 0.4064."] + lines[at + 1:]
    with pytest.raises(ValueError, match="could not be read: lightning\\) being necessary"):
        solve("\n".join(gutted))
