"""nanocausal.scm: formulas pinned by hand, closed forms against brute-force counterfactuals,
the solver against every official label, generator self-consistency, statistics and errors."""
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from nanocausal import scm
from nanocausal.rewards import is_correct
from nanocausal.scm import (LACK, P, Query, answer_json, evaluate, formula, generate, is_zero, problems, solve)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "caugym"


def official(name):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} (the official CauGym files in the team's shared folder) is not present")
    path = DATA / name
    return json.load(open(path)) if name.endswith(".json") else [json.loads(ln) for ln in open(path)]


def table(entries):
    """{(targets, cond): p} -> a lookup function as Statements.lookup (with complements)."""
    store = scm.Statements()
    for (targets, cond), p in entries.items():
        store.add(targets, cond, p)
    return store.lookup

# ----------------------------------------------------------------------------- hand-worked formulas
X, Y, Z, M = 0, 1, 2, 3


def test_ate_with_adjustment_by_hand():
    q = Query("ATE", X, Y, x=1, y=1)
    look = table({(((Y, 1),), ((X, 1), (Z, 0))): 0.8, (((Y, 1),), ((X, 0), (Z, 0))): 0.5,
                  (((Y, 1),), ((X, 1), (Z, 1))): 0.6, (((Y, 1),), ((X, 0), (Z, 1))): 0.2, (((Z, 0),), ()): 0.3})
    # (0.8 - 0.5) * 0.3 + (0.6 - 0.2) * 0.7 = 0.09 + 0.28
    assert evaluate(formula(q, (Z,)), look) == pytest.approx(0.37)
    # asking about y = 0 flips the sign (complements 1 - p)
    assert evaluate(formula(Query("ATE", X, Y, x=1, y=0), (Z,)), look) == pytest.approx(-0.37)


def test_ett_is_factual_minus_counterfactual():
    q = Query("ETT", X, Y, x=0, y=1, xf=1)
    look = table({(((Y, 1),), ((X, 1),)): 0.5, (((Y, 1),), ((X, 0), (Z, 0))): 0.6,
                  (((Y, 1),), ((X, 0), (Z, 1))): 0.2, (((Z, 0),), ((X, 1),)): 0.25})
    # 0.5 - (0.6 * 0.25 + 0.2 * 0.75) = 0.2
    assert evaluate(formula(q, (Z,)), look) == pytest.approx(0.2)
    assert answer_json("ETT", 0.2) == '{"ANSWER": "No", "PROB": "0.2000"}'
    assert answer_json("ETT", -0.001) == '{"ANSWER": "Yes", "PROB": "-0.0010"}'


def test_nde_nie_cde_by_hand():
    look = table({(((Y, 1),), ((M, 0), (X, 1))): 0.9, (((Y, 1),), ((M, 0), (X, 0))): 0.5,
                  (((Y, 1),), ((M, 1), (X, 1))): 0.4, (((Y, 1),), ((M, 1), (X, 0))): 0.3,
                  (((M, 0),), ((X, 0),)): 0.6, (((M, 0),), ((X, 1),)): 0.2})
    # NDE = (0.9 - 0.5) * 0.6 + (0.4 - 0.3) * 0.4 = 0.28
    assert evaluate(formula(Query("NDE", X, Y, x=1, y=1), (), (M,)), look) == pytest.approx(0.28)
    # NIE (x = 1, x' = 0) = 0.5 * (0.2 - 0.6) + 0.3 * (0.8 - 0.4) = -0.08
    assert evaluate(formula(Query("NIE", X, Y, x=1, y=1), (), (M,)), look) == pytest.approx(-0.08)
    # CDE conditioned on M=1 = 0.4 - 0.3
    assert evaluate(formula(Query("CDE", X, Y, x=1, y=1, w=((M, 1),))), look) == pytest.approx(0.1)
    assert answer_json("CDE", 0.001) == '{"ANSWER": "Yes", "PROB": "0.0010"}'
    assert answer_json("NDE", 0.0009) == '{"ANSWER": "No", "PROB": "0.0009"}'


def test_pn_ps_bounds_by_hand():
    pn = Query("PN", X, Y, x=0, y=0, xf=1, yf=1, bound="upper")
    look = table({(((Y, 0),), ((X, 0),)): 0.6, (((X, 0), (Y, 0)), ()): 0.2, (((X, 1), (Y, 1)), ()): 0.5,
                  (((Y, 1),), ()): 0.7})
    assert evaluate(formula(pn), look) == pytest.approx(0.8)                 # (0.6 - 0.2) / 0.5
    lower = Query("PN", X, Y, x=0, y=0, xf=1, yf=1, bound="lower")
    assert evaluate(formula(lower), look) == pytest.approx(0.6)              # (0.7 - 0.4) / 0.5
    clipped = table({(((Y, 0),), ((X, 0),)): 0.9, (((X, 0), (Y, 0)), ()): 0.1, (((X, 1), (Y, 1)), ()): 0.2,
                     (((Y, 1),), ()): 0.05})
    assert evaluate(formula(pn), clipped) == 1.0 and evaluate(formula(lower), clipped) == 0.0
    assert answer_json("PS", 1.0) == '{"PROB": "1.0000"}'


def test_solve_hand_written_problem():
    text = ("Input Info: Imagine a self-contained, hypothetical world with only the following conditions, and "
            "without any unmentioned factors or causal relationships: Rain has a direct effect on mud. Wind has a "
            "direct effect on mud.\nFor those with rain being low, the probability of mud being high is 0.2000. For "
            "those with rain being high, the probability of mud being high is 0.7500. \nInstruction: Consider the "
            "average treatment effect (ATE) of rain on mud.\nQuestion: If rain is changed to be low, will mud be "
            "more likely to be low?\n" + scm.PROVIDE)
    assert solve(text) == '{"ANSWER": "Yes", "PROB": "0.5500"}'          # (1 - 0.2) - (1 - 0.75)
    assert solve(text.replace("For those with rain being high, the probability of mud being high is 0.7500. ",
                              "")) == LACK
    assert solve(text.replace("Rain has a direct effect on mud. ", "Mud has a direct effect on rain. ")) \
        == '{"ANSWER": "No", "PROB": "0.0000"}'                           # no path rain -> mud

# ----------------------------------------------------------------------------- brute force
def exogenous_states(model):
    """Enumerate U: for each node the intervals of U_V between its CPT thresholds (V = 1 iff
    U_V < P(V=1 | parents)); yields (representative u per node, probability)."""
    per_node = []
    for v in range(model.graph.n):
        cuts = sorted({0.0, 1.0, *model.cpt[v]})
        per_node.append([((a + b) / 2, b - a) for a, b in zip(cuts, cuts[1:])])
    for combo in itertools.product(*per_node):
        yield [u for u, _ in combo], math.prod(w for _, w in combo)


def world(model, u, do=()):
    do, val = dict(do), []
    for v in range(model.graph.n):
        k = sum(val[p] << i for i, p in enumerate(model.graph.parents[v]))
        val.append(do[v] if v in do else int(u[v] < model.cpt[v][k]))
    return val


def brute_force(model, q, m):
    """The quantity by intervention on the enumerated SCM (PN/PS: the value itself, not a bound)."""
    X, Y, x, y = q.x_var, q.y_var, q.x, q.y
    num = den = 0.0
    for u, w in exogenous_states(model):
        if q.task in ("ATE", "CDE"):
            num += w * ((world(model, u, {X: x, **dict(q.w)})[Y] == y) - (world(model, u, {X: 1 - x, **dict(q.w)})[Y] == y))
        elif q.task == "ETT":
            if world(model, u)[X] == q.xf:
                den += w
                num += w * ((world(model, u)[Y] == y) - (world(model, u, {X: x})[Y] == y))
        elif q.task in ("NDE", "NIE"):
            base = world(model, u, {X: 1 - x})[Y] == y
            if q.task == "NDE":   # Y_{x, M_{x'}} - Y_{x'}
                mediators = world(model, u, {X: 1 - x})
                cross = world(model, u, {X: x, **{v: mediators[v] for v in m}})[Y] == y
            else:                 # Y_{x', M_x} - Y_{x'}
                mediators = world(model, u, {X: x})
                cross = world(model, u, {X: 1 - x, **{v: mediators[v] for v in m}})[Y] == y
            num += w * (cross - base)
        else:
            fact = world(model, u)
            if fact[X] == q.xf and fact[Y] == q.yf:
                den += w
                num += w * (world(model, u, {X: x})[Y] == y)
    return num / den if den else num


def no_rounding(expr):
    if expr[0] == "P":
        return expr
    return no_rounding(expr[1]) if expr[0] == "r4" else (expr[0], *map(no_rounding, expr[1:]))


def test_closed_forms_match_brute_force_on_small_graphs():
    items = problems(84, nodes=(3, 4), seed=11, split="brute", questions_per_model=7) + \
        problems(14, nodes=5, seed=12, split="brute", questions_per_model=7)
    checked = 0
    for p in items:
        model, q = p.scm, p.q
        # the enumeration reproduces the model's observational joint
        assert sum(w for u, w in exogenous_states(model) if world(model, u)[q.y_var] == 1) == \
            pytest.approx(model.prob(((q.y_var, 1),)))
        g = model.graph
        zero = is_zero(q, g)
        # a zero NDE/NIE holds every intermediate node of X -> Y as a mediator
        truth = brute_force(model, q, tuple(g.desc[q.x_var] & g.anc[q.y_var]) if zero else p.m)
        if zero:
            assert truth == pytest.approx(0.0, abs=1e-12), q
            continue
        exact = lambda t, c: model.prob(t, c)
        if q.task in ("PN", "PS"):
            upper = evaluate(no_rounding(formula(Query(**{**q.__dict__, "bound": "upper"}), p.z)), exact)
            lower = evaluate(no_rounding(formula(Query(**{**q.__dict__, "bound": "lower"}), p.z)), exact)
            assert lower - 1e-9 <= truth <= upper + 1e-9, (q, lower, truth, upper)
        else:
            assert evaluate(formula(q, p.z, p.m), exact) == pytest.approx(truth, abs=1e-9), q
            # and the label, computed from the 4-decimal numbers shown, stays close to the truth
            assert float(json.loads(p.answer)["PROB"]) == pytest.approx(truth, abs=0.002)
        checked += 1
    assert checked > 50

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

# ----------------------------------------------------------------------------- generator
def test_every_generated_item_solves_to_its_label():
    count = 0
    for variant in scm.VARIANTS:
        for nodes, n in (("3-5", 140), (8, 110), (10, 70)):
            for it in generate(n, variant=variant, nodes=nodes, seed=5, split="selfcheck"):
                assert solve(it["problem"]) == it["answer"], (variant, it["problem"])
                assert it["solution"].rstrip().endswith(it["answer"])
                count += 1
    assert count == 6 * 320


def test_generate_is_deterministic_and_splits_share_no_model():
    a = generate(40, seed=3)
    assert a == generate(40, seed=3) and a != generate(40, seed=4)
    assert set(a[0]) == {"problem", "answer", "solution", "type", "variant"}
    fingerprint = lambda p: (tuple(p.scm.names), tuple(p.scm.graph.parents), tuple(map(tuple, p.scm.cpt)))
    train = {fingerprint(p) for p in problems(200, split="train", seed=0)}
    test = {fingerprint(p) for p in problems(200, split="test", seed=0)}
    assert len(train) >= 10 and not train & test


def test_variants_have_no_surface_cue():
    for style_variant in ("deconfounding", "redundant", "insufficient", "omitted", "rephrased"):
        for p in problems(70, variant=style_variant, seed=9, split="cue"):
            stmt_line = p.problem.split("\n")[1]
            assert stmt_line == "" or stmt_line.endswith(". "), stmt_line[-20:]
            assert ("Instruction:" in p.problem) == (p.variant != "omitted")
            coded = re.search(r"\([A-Z]=[01]\)", p.problem) is not None
            assert coded == (p.style == "generated") or not stmt_line
            zero = is_zero(p.q, p.scm.graph)
            needed = scm.Statements() if zero else scm._show_facts(p.scm, p.q, p.z, p.m, p.style)
            if p.variant == "redundant":
                assert len(p.store.facts()) == len(needed.facts()) + 2
            if p.variant == "insufficient":
                assert p.answer == LACK and len(p.store.groups) == len(needed.groups) - 2
            if p.variant == "deconfounding" and p.q.task not in ("PN", "PS"):
                assert p.z and not is_zero(p.q, p.scm.graph)
    rephrased = generate(30, variant="rephrased", seed=2)
    assert sum(scm.PREAMBLES[0] not in it["problem"] for it in rephrased) > 5
    assert sum(any(t.split("{")[0] in it["problem"] for t in scm.CONDS[1:] + scm.MARGS[1:]) for it in rephrased) > 5


def test_base_statistics_match_official():
    items = generate(2800, seed=21, split="stats")
    effects = [json.loads(it["answer"]) for it in items if it["type"] in ("ATE", "CDE", "NDE", "NIE")]
    zero = sum(float(a["PROB"]) == 0 for a in effects) / len(effects)
    yes = sum(a["ANSWER"] == "Yes" for a in effects) / len(effects)
    ones = {t: statistics.mean(float(json.loads(it["answer"])["PROB"]) == 1 for it in items if it["type"] == t)
            for t in ("PN", "PS")}
    close = lambda ours, theirs: abs(ours - theirs) <= 0.2 * theirs
    # causal_tasks.md / base.json: zero share 33 %, Yes share 30-39 %, median 1017 chars, PN/PS = 1 in 18 % / 33 %
    assert close(zero, 0.33), zero
    assert close(yes, 0.3575), yes
    assert close(statistics.median(len(it["problem"]) for it in items), 1017)
    assert close(ones["PN"], 0.18) and close(ones["PS"], 0.33), ones


def test_rejected_answers_are_wrong_and_chosen_right():
    items = problems(84, variant=list(scm.VARIANTS), seed=4, split="dpo")
    rows = list(scm.dataset_rows(items, "dpo", 0))
    for p, row in zip(items, rows):
        assert row["prompt"] == scm.official_prompt(p.problem, p.variant)
        assert is_correct(row["chosen"], p.answer) and not is_correct(row["rejected"], p.answer)
    kto = list(scm.dataset_rows(items, "kto", 0))
    assert sum(r["label"] for r in kto) == len(kto) // 2
    assert all(is_correct(r["completion"], p.answer) == r["label"] for p, r in zip(items, kto))


def test_official_prompt():
    assert scm.official_prompt("Q", "base") == "Q\nLet's think step by step."
    assert scm.official_prompt("Q", "insufficient") == ("Q\nLet's think step by step. If the condition is not "
                                                        "enough to solve the question, output \"LACK_CONDITION\" "
                                                        "as final answer.")

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


def test_cli(tmp_path, capsys):
    out = tmp_path / "rl.jsonl"
    scm.main(["--format", "rl", "--n", "7", "--out", str(out), "--variant", "base,insufficient"])
    rows = [json.loads(ln) for ln in open(out)]
    assert [set(r) for r in rows] == [{"prompt", "answer", "type", "variant"}] * 7
    for fmt, keys in (("sft", {"prompt", "completion"}), ("dpo", {"prompt", "chosen", "rejected"}),
                      ("kto", {"prompt", "completion", "label"})):
        scm.main(["--format", fmt, "--n", "4", "--out", str(out)])
        assert all(set(json.loads(ln)) == keys for ln in open(out))
    for bad in (["--tasks", "ATE,XYZ"], ["--variant", "nope"], ["--out", str(tmp_path / "no" / "x.jsonl")],
                ["--solve", str(tmp_path / "missing.json")], ["--nodes", "1"]):
        with pytest.raises(SystemExit):
            scm.main(bad + ["--n", "2"])
        assert "error:" in capsys.readouterr().err
    problems_file = tmp_path / "p.jsonl"
    problems_file.write_text(json.dumps({"problem": "not a problem"}) + "\n")
    with pytest.raises(SystemExit):
        scm.main(["--solve", str(problems_file)])
    assert "item 0" in capsys.readouterr().err
