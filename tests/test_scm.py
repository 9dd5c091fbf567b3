"""nanocausal.scm: formulas pinned by hand and closed forms against brute-force counterfactuals
on enumerated SCMs."""
import itertools
import json
import math

import pytest

from nanocausal.problem_text import Statements
from nanocausal.problems import problems
from nanocausal.scm import Query, answer_json, formula, is_zero, value_of


def table(entries):
    """{(targets, cond): p} -> a lookup function as Statements.lookup (with complements)."""
    store = Statements()
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
    assert value_of(formula(q, (Z,)), look) == pytest.approx(0.37)
    # asking about y = 0 flips the sign (complements 1 - p)
    assert value_of(formula(Query("ATE", X, Y, x=1, y=0), (Z,)), look) == pytest.approx(-0.37)


def test_ett_is_factual_minus_counterfactual():
    q = Query("ETT", X, Y, x=0, y=1, xf=1)
    look = table({(((Y, 1),), ((X, 1),)): 0.5, (((Y, 1),), ((X, 0), (Z, 0))): 0.6,
                  (((Y, 1),), ((X, 0), (Z, 1))): 0.2, (((Z, 0),), ((X, 1),)): 0.25})
    # 0.5 - (0.6 * 0.25 + 0.2 * 0.75) = 0.2
    assert value_of(formula(q, (Z,)), look) == pytest.approx(0.2)
    assert answer_json("ETT", 0.2) == '{"ANSWER": "No", "PROB": "0.2000"}'
    assert answer_json("ETT", -0.001) == '{"ANSWER": "Yes", "PROB": "-0.0010"}'


def test_nde_nie_cde_by_hand():
    look = table({(((Y, 1),), ((M, 0), (X, 1))): 0.9, (((Y, 1),), ((M, 0), (X, 0))): 0.5,
                  (((Y, 1),), ((M, 1), (X, 1))): 0.4, (((Y, 1),), ((M, 1), (X, 0))): 0.3,
                  (((M, 0),), ((X, 0),)): 0.6, (((M, 0),), ((X, 1),)): 0.2})
    # NDE = (0.9 - 0.5) * 0.6 + (0.4 - 0.3) * 0.4 = 0.28
    assert value_of(formula(Query("NDE", X, Y, x=1, y=1), (), (M,)), look) == pytest.approx(0.28)
    # NIE (x = 1, x' = 0) = 0.5 * (0.2 - 0.6) + 0.3 * (0.8 - 0.4) = -0.08
    assert value_of(formula(Query("NIE", X, Y, x=1, y=1), (), (M,)), look) == pytest.approx(-0.08)
    # CDE conditioned on M=1 = 0.4 - 0.3
    assert value_of(formula(Query("CDE", X, Y, x=1, y=1, w=((M, 1),))), look) == pytest.approx(0.1)
    assert answer_json("CDE", 0.001) == '{"ANSWER": "Yes", "PROB": "0.0010"}'
    assert answer_json("NDE", 0.0009) == '{"ANSWER": "No", "PROB": "0.0009"}'


def test_pn_ps_bounds_by_hand():
    pn = Query("PN", X, Y, x=0, y=0, xf=1, yf=1, bound="upper")
    look = table({(((Y, 0),), ((X, 0),)): 0.6, (((X, 0), (Y, 0)), ()): 0.2, (((X, 1), (Y, 1)), ()): 0.5,
                  (((Y, 1),), ()): 0.7})
    assert value_of(formula(pn), look) == pytest.approx(0.8)                 # (0.6 - 0.2) / 0.5
    lower = Query("PN", X, Y, x=0, y=0, xf=1, yf=1, bound="lower")
    assert value_of(formula(lower), look) == pytest.approx(0.6)              # (0.7 - 0.4) / 0.5
    clipped = table({(((Y, 0),), ((X, 0),)): 0.9, (((X, 0), (Y, 0)), ()): 0.1, (((X, 1), (Y, 1)), ()): 0.2,
                     (((Y, 1),), ()): 0.05})
    assert value_of(formula(pn), clipped) == 1.0 and value_of(formula(lower), clipped) == 0.0
    assert answer_json("PS", 1.0) == '{"PROB": "1.0000"}'

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
            upper = value_of(no_rounding(formula(Query(**{**q.__dict__, "bound": "upper"}), p.z)), exact)
            lower = value_of(no_rounding(formula(Query(**{**q.__dict__, "bound": "lower"}), p.z)), exact)
            assert lower - 1e-9 <= truth <= upper + 1e-9, (q, lower, truth, upper)
        else:
            assert value_of(formula(q, p.z, p.m), exact) == pytest.approx(truth, abs=1e-9), q
            # and the label, computed from the 4-decimal numbers shown, stays close to the truth
            assert float(json.loads(p.answer)["PROB"]) == pytest.approx(truth, abs=0.002)
        checked += 1
    assert checked > 50
