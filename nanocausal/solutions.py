"""Worked solutions (`solution`, the SFT target) and plausible wrong ones (`rejected_solution`, for
DPO / KTO), for one generated Problem (nanocausal.problems.Problem).

Both print the formulas of nanocausal.scm (one tree for the label, the solver and the text). A
Problem is only read here (p.scm, p.q, p.z, p.m, p.store, p.answer, p.problem); nanocausal.problems,
which defines it, imports this module.
"""
from dataclasses import replace

from nanocausal.caugym import LACK, is_correct
from nanocausal.scm import CLAMPS, answer_json, formula, is_zero, leaves, letter, round_answer, show, value_of

# ----------------------------------------------------------------------------- worked solution
def _symbol(leaf):
    """P-node -> "P(B=1|A=0,C=1)" (letters in topological order, 0/1 value codes)."""
    show_pairs = lambda pairs: ",".join(f"{letter(v)}={val}" for v, val in pairs)
    return f"P({show_pairs(leaf[1])}" + (f"|{show_pairs(leaf[2])})" if leaf[2] else ")")


def _structure(p):
    """The graph step: why the quantity is (not) zero, and which sets identify it."""
    g, q = p.scm.graph, p.q
    X, Y = letter(q.x_var), letter(q.y_var)
    arrow = lambda path: "->".join(letter(v) for v in path)
    if is_zero(q, g):
        return [f"There is no edge {X}->{Y}, so {q.task} = 0." if q.task in ("CDE", "NDE") else
                f"No directed path from {X} to {Y} passes through a third node, so NIE = 0." if q.task == "NIE" else
                f"There is no directed path from {X} to {Y}, so changing {X} cannot change {Y}: {q.task} = 0."]
    if q.task in ("CDE", "NDE"):
        steps = [f"The edge {X}->{Y} exists."]
    elif q.task == "NIE":
        path = next(g.example_path(c, q.y_var) for c in g.children[q.x_var] if q.y_var in g.desc[c])
        steps = [f"There is a directed path through a mediator ({X}->{arrow(path)})."]
    else:
        steps = [f"There is a directed path {arrow(g.example_path(q.x_var, q.y_var))}, so {X} can affect {Y}."]
    if q.task in ("NDE", "NIE"):
        steps.append(f"Mediator set: {{{letter(p.m[0])}}}, on every directed path from {X} to {Y} except {X}->{Y}."
                     if p.m else f"Mediator set: empty, {X}->{Y} is the only directed path.")
    if q.task == "CDE":
        steps.append("Intervene on the conditioning set {" + ",".join(letter(v) for v, _ in q.w) + "} as well.")
    z = p.z
    steps.append(f"Backdoor adjustment set: {{{letter(z[0])}}}; it is not a descendant of {X} and blocks every "
                 f"backdoor path into {X}." if z else f"Backdoor adjustment set: empty, no backdoor path into {X} "
                 f"is open.")
    return steps


def _arithmetic(tree, lookup):
    """Numbers substituted, then each top-level operand reduced, then the result."""
    num = lambda leaf: f"{lookup(leaf[1], leaf[2]):.4f}"
    lines = [show(tree, num)]
    body, wrap = (tree[1], tree[0]) if tree[0] in ("min1", "max0") else (tree, None)
    if body[0] != "P" and any(c[0] != "P" for c in body[1:]):
        fmt = lambda c, v: (f"{v:.4f}" if c[0] == "P" else f"{v:.6f}") if v >= 0 else f"({v:.6f})"
        parts = f" {body[0]} ".join(fmt(c, value_of(c, lookup)) for c in body[1:])
        lines.append(CLAMPS[wrap].format(parts) if wrap else parts)
    if wrap:
        lines.append(CLAMPS[wrap].format(f"{value_of(body, lookup):.4f}"))
    return lines


def solution(p, tree=None, lookup=None, value=None, missing=None):
    """The worked answer (SFT target): variables, graph, sets, formula, numbers, arithmetic,
    conclusion, answer JSON. Arguments override the correct reasoning (for the rejected answers
    of DPO): another tree, other numbers (lookup), another final value, or a claim that the
    statements miss `missing` (leaves) and the answer is LACK_CONDITION."""
    scm, q = p.scm, p.q
    X, Y = letter(q.x_var), letter(q.y_var)
    tree = tree or formula(q, p.z, p.m)
    lookup = lookup or p.store.lookup
    used = dict.fromkeys([q.x_var, q.y_var, *(v for v, _ in q.w), *p.m, *p.z])
    steps = ["Variables: " + "; ".join(f"{letter(v)} = {scm.names[v]} ({letter(v)}=0: {scm.values[v][0]}, "
                                       f"{letter(v)}=1: {scm.values[v][1]})" for v in used) + "."]
    steps.append(f"Treatment {X}, outcome {Y}; the question sets {X}={q.x} and asks about {Y}={q.y}" +
                 (f", given the factual {X}={q.xf}" if q.xf is not None else "") +
                 (f" and {Y}={q.yf}" if q.yf is not None else "") +
                 (f", with {' and '.join(f'{letter(v)}={b}' for v, b in q.w)}" if q.w else "") +
                 (f"; it asks for the {q.bound} bound" if q.bound else "") + ".")
    steps += _structure(p)
    if is_zero(q, scm.graph) and missing is None:
        steps.append(f"So {q.task} = 0.0000, and the answer is No.")
        return _numbered(steps) + "\n" + answer_json(q.task, 0.0)
    steps.append(f"{q.task} = {show(tree, _symbol)}")
    if missing is not None:
        gaps = ", ".join(_symbol(leaf) for leaf in missing)
        steps.append(f"The statements give no value for {gaps} (nor its complement), and no other valid "
                     f"adjustment or mediator set is covered by them, so {q.task} cannot be computed from the given "
                     f"conditions.")
        return _numbered(steps) + "\n" + LACK
    values = []
    for leaf in dict.fromkeys(leaves(tree)):
        v, key = lookup(leaf[1], leaf[2]), (frozenset(leaf[1]), frozenset(leaf[2]))
        shown_as_complement = key not in p.store.table and p.store.shows(leaf[1], leaf[2])
        values.append(f"{_symbol(leaf)} = 1 - {1 - v:.4f} = {v:.4f}" if shown_as_complement
                      else f"{_symbol(leaf)} = {v:.4f}")
    steps.append("From the statements: " + "; ".join(values) + ".")
    result = round_answer(value_of(tree, lookup)) if value is None else value
    steps.append(f"{q.task} = " + " = ".join(_arithmetic(tree, lookup)) + f" = {result:.4f}")
    if q.task in ("PN", "PS"):
        steps.append(f"The {q.bound} bound of {q.task} is {result:.4f}.")
    elif q.task == "ETT":
        yes = result <= -0.001
        steps.append(f"ETT = E[{Y}_(xf) - {Y}_(x) | {X}={q.xf}] = {result:.4f} "
                     f"{'<=' if yes else '>'} -0.001, so {Y}={q.y} would {'' if yes else 'not '}have been "
                     f"more likely: the answer is {'Yes' if yes else 'No'}.")
    else:
        yes = result >= 0.001
        steps.append(f"{q.task} = {result:.4f} {'>=' if yes else '<'} 0.001, so the answer is "
                     f"{'Yes' if yes else 'No'}.")
    return _numbered(steps) + "\n" + answer_json(q.task, result)


def _numbered(steps):
    """The steps as "Step 1: ...", one a line."""
    return "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))

# ----------------------------------------------------------------------------- wrong answers
def _first_terms(expr):
    """Forget the baseline: every a - b becomes a (a wrong-formula mistake)."""
    if expr[0] == "P":
        return expr
    if expr[0] == "-":
        return _first_terms(expr[1])
    return (expr[0], *[_first_terms(e) for e in expr[1:]])


def _one_stratum(expr, zvar):
    """Condition on z=0 instead of adjusting: keep the z=0 terms of each sum, drop P(z)."""
    if expr[0] == "P":
        return expr
    if expr[0] == "+":
        keep = [e for e in expr[1:] if e[0] == "*" and e[-1][0] == "P" and e[-1][1] == ((zvar, 0),)]
        if keep:
            kept = [("*", *e[1:-1]) if len(e) > 3 else e[1] for e in keep]
            return _one_stratum(kept[0] if len(kept) == 1 else ("+", *kept), zvar)
    return (expr[0], *[_one_stratum(e, zvar) for e in expr[1:]])


def rejected_solution(p, rng):
    """A plausible but wrong worked answer for DPO / KTO: a sign or complement error, a wrong
    formula, a missing adjustment, an arithmetic slip, a wrong LACK_CONDITION (or, for an
    insufficient item, a number computed from a guessed 0.5). Never scored correct."""
    q, tree = p.q, formula(p.q, p.z, p.m)
    if p.answer == LACK:
        guess = lambda t, c: p.store.lookup(t, c) if p.store.shows(t, c) else 0.5
        kinds = {"guess": lambda: solution(p, tree, lookup=guess)}
    elif is_zero(q, p.scm.graph):
        steps = solution(p).split("\n")[:2]   # variables and roles, then a wrong reading of "no numbers"
        kinds = {"lack": lambda: "\n".join(steps) + f"\nStep 3: The statements give no probabilities for "
                 f"{letter(q.x_var)} and {letter(q.y_var)}, so {q.task} cannot be computed from the given "
                 f"conditions.\n{LACK}"}
    else:
        def arithmetic():
            v = round_answer(value_of(tree, p.store.lookup))
            for delta in rng.sample([0.01, -0.01, 0.1, -0.1, 0.002, -0.002, 0.05, -0.05], 8):
                if (0 <= v + delta <= 1) if q.task in ("PN", "PS") else -1 <= v + delta <= 1:
                    return solution(p, value=round_answer(v + delta))
        swap = {"NDE": "NIE", "NIE": "NDE"}
        asked_otherwise = lambda **change: solution(p, formula(replace(q, **change), p.z, p.m))
        kinds = {
            "sign": lambda: None if q.task in ("PN", "PS") else solution(p, (tree[0], tree[2], tree[1])) if
            q.task == "ETT" else asked_otherwise(x=1 - q.x),
            "formula": lambda: solution(p, _first_terms(tree)),
            "swap": lambda: asked_otherwise(task=swap[q.task]) if q.task in swap else None,
            "bound": lambda: asked_otherwise(bound="upper" if q.bound == "lower" else "lower") if q.bound else None,
            "adjust": lambda: solution(p, _one_stratum(tree, p.z[0])) if p.z else None,
            "arithmetic": arithmetic,
            "lack": lambda: solution(p, tree, missing=[rng.choice(leaves(tree))]),
        }
    names = list(kinds)
    rng.shuffle(names)
    for name in names:
        try:
            text = kinds[name]()
        except (KeyError, ZeroDivisionError):
            continue
        if text and not is_correct(text, p.answer):
            return text
    raise ValueError(f"no wrong answer found for {p.problem[:80]!r}")

