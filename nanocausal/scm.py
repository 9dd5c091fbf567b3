"""CauGym-style causal problems: sample a structural causal model (SCM), ask one of seven
questions about it, render the problem text, solve it exactly, and write training datasets.

Conventions (../shared/docs/causal_tasks.md, checked against every official label):
all variables are binary; X is the treatment, Y the outcome; x is the value X "is changed to"
(for ETT/PN/PS the counterfactual value), x' the other one; xf, yf are factual values.

    ATE = sum_z [P(y|x,z) - P(y|x',z)] P(z)                                Yes iff v >= 0.001
    CDE = sum_z [P(y|x,w,z) - P(y|x',w,z)] P(z)      (W = conditioning set) Yes iff v >= 0.001
    ETT = P(y|xf) - sum_z P(y|x,z) P(z|xf)           (factual - counterf.)  Yes iff v <= -0.001
    NDE = sum_{m,z} [P(y|x,m,z) - P(y|x',m,z)] P(m|x',z) P(z)               Yes iff v >= 0.001
    NIE = sum_{m,z} P(y|x',m,z) [P(m|x,z) - P(m|x',z)] P(z)                 Yes iff v >= 0.001
    PN/PS upper = min{1, [P(y|do(x)) - P(x,y)] / P(xf,yf)}      (Tian and Pearl, 2000)
    PN/PS lower = max{0, [P(yf) - P(yf|do(x))] / P(xf,yf)}      (= [P(y_x) - P(y)] / P(xf,yf))

Z is a backdoor set (empty when valid, else one node), M a mediator intercepting every
directed X -> Y path but the edge X -> Y. The answer is 0 / "No" when the needed structure is
missing (no directed path; no edge X -> Y for CDE/NDE; no mediated path for NIE). Every value is
computed from the 4-decimal numbers shown in the problem (complements as 1 - p); PN/PS round
P(y|do(x)) to 4 decimals first. A formula is an expression tree (`P`, `Sum`, `Diff`, ...) that
is evaluated, printed symbolically and printed with numbers by the same code, so the generator,
the solver and the worked solution can never disagree.
"""
import argparse
import functools
import json
import random
import re
import sys
from dataclasses import dataclass, field

import numpy as np

TASKS = ("ATE", "CDE", "ETT", "NDE", "NIE", "PN", "PS")
VARIANTS = ("base", "omitted", "rephrased", "deconfounding", "redundant", "insufficient")
LACK = "LACK_CONDITION"
LONG_NAME = {"ATE": "average treatment effect", "CDE": "controlled direct effect",
             "ETT": "effect of treatment on the treated", "NDE": "natural direct effect",
             "NIE": "natural indirect effect", "PN": "probability of necessity",
             "PS": "probability of sufficiency"}
STEP = "Let's think step by step."
LACK_HINT = 'If the condition is not enough to solve the question, output "LACK_CONDITION" as final answer.'


def official_prompt(problem, variant="base", lack_hint=None):
    """User message of the official protocol (CauGym eval/sample_generate.py): problem + "\\n" +
    "Let's think step by step."; insufficient items (or lack_hint=True) also get the LACK hint."""
    hint = variant == "insufficient" if lack_hint is None else lack_hint
    return problem + "\n" + STEP + (" " + LACK_HINT if hint else "")

# ----------------------------------------------------------------------------- names
# Coherent stories list causes before effects, so a topological order reads naturally.
# "name" alone means values low/high; "name:a/b" gives the values for 0 and 1.
THEMES = [
    "weather conditions:bad/good; amount of rainfall:small/large; temperature:cold/hot; irrigation:absent/present; "
    "soil moisture level; pest infestation:absent/present; fertilizer use; plant health:poor/good; crop yield; "
    "harvest quality:poor/good; farm income; food prices",
    "parents' income; neighborhood safety:unsafe/safe; access to quality schools:limited/abundant; "
    "child's nutrition status:poor/good; study hours; quality of teaching; student motivation; "
    "exam performance:poor/good; college admission:rejected/admitted; salary after graduation; job satisfaction; "
    "life satisfaction",
    "air pollution; smoking:no/yes; physical activity; diet quality:poor/good; blood pressure; cholesterol level; "
    "stress level; sleep quality:poor/good; heart disease:absent/present; hospital visits:few/many; medical costs; "
    "life expectancy:short/long",
    "fuel prices; availability of public transportation:limited/abundant; number of cars on the road:few/many; "
    "road construction:absent/present; traffic congestion:light/heavy; commute time:short/long; "
    "arrival time at work:on time/delayed; employee mood:unhappy/happy; productivity level at work; "
    "overall job satisfaction; company profit; employee turnover",
    "market demand; advertising budget; brand reputation:negative/positive; product quality:poor/good; "
    "customer satisfaction; sales volume; inventory level; production costs; company revenue; stock price; "
    "investor confidence; hiring rate",
    "work experience; level of education; skills:lacking/proficient; certifications:absent/present; "
    "leadership qualities:poor/strong; job performance:poor/excellent; promotion opportunities:few/many; salary; "
    "work-life balance:poor/good; mental health:poor/good; family support:weak/strong; happiness:unhappy/happy",
]
THEME_VARS = [[(s.split(":")[0].strip(), tuple(s.split(":")[1].split("/")) if ":" in s else ("low", "high"))
               for s in theme.split(";")] for theme in THEMES]
ALL_VARS = [v for theme in THEME_VARS for v in theme]
VALUE_PAIRS = [("low", "high")] * 7 + [("poor", "good"), ("small", "large"), ("few", "many"), ("no", "yes")]


def sample_names(rng, n, kind):
    """n (name, (value0, value1)) pairs: 'story' (one coherent theme, in causal order),
    'real' (random real-world names) or 'nonsense' (4 random letters)."""
    if kind == "story":
        theme = rng.choice(THEME_VARS)
        return [theme[i] for i in sorted(rng.sample(range(len(theme)), n))]
    if kind == "real":
        return rng.sample(ALL_VARS, n)
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)))
    return [(name, rng.choice(VALUE_PAIRS)) for name in sorted(names, key=lambda s: rng.random())]

# ----------------------------------------------------------------------------- graph
class Graph:
    """A DAG over nodes 0..n-1 given by parent tuples (node i's letter is chr(65 + i))."""

    def __init__(self, parents):
        self.n, self.parents = len(parents), [tuple(p) for p in parents]
        self.children = [tuple(c for c in range(self.n) if v in self.parents[c]) for v in range(self.n)]
        self.desc = [self._reach(v, self.children) for v in range(self.n)]   # strict descendants
        self.anc = [self._reach(v, self.parents) for v in range(self.n)]     # strict ancestors
        self._memo = {}

    @staticmethod
    def _reach(v, nbrs, skip=()):
        seen, stack = set(), list(nbrs[v])
        while stack:
            u = stack.pop()
            if u not in seen and u not in skip:
                seen.add(u)
                stack.extend(nbrs[u])
        return seen

    def has_path(self, x, y):
        return y in self.desc[x]

    def has_indirect_path(self, x, y):
        """A directed path x -> ... -> y of at least three nodes."""
        return any(y in self.desc[c] for c in self.children[x])

    def mediates(self, m, x, y):
        """m lies on every directed path x -> ... -> y except the edge x -> y."""
        return not any(y in self._reach(c, self.children, skip={m}) for c in self.children[x] if c not in (m, y))

    def d_connected(self, sources, target, given, cut=()):
        """Is `target` d-connected to a node of `sources` given `given`, in the graph without the
        edges out of `cut`? (Bayes-ball reachability, Koller and Friedman, Alg. 3.1.)"""
        given = set(given)
        lit = given | {a for g in given for a in self.anc[g]}   # colliders in here are open
        todo, seen = [(s, "up") for s in sources], set()
        while todo:
            v, way = todo.pop()
            if (v, way) in seen:
                continue
            seen.add((v, way))
            if v == target and v not in given:
                return True
            kids = () if v in cut else self.children[v]
            if way == "up" and v not in given:
                todo += [(p, "up") for p in self.parents[v] if p not in cut] + [(c, "down") for c in kids]
            elif way == "down":
                if v not in given:
                    todo += [(c, "down") for c in kids]
                if v in lit:
                    todo += [(p, "up") for p in self.parents[v] if p not in cut]
        return False

    def backdoor(self, treatments, y, z):
        """z adjusts for do(treatments) on y: no node of z descends from a treatment, and z
        blocks every path from a treatment to y that starts with an arrow into it."""
        if any(v in treatments or v == y or v in self.desc[t] for v in z for t in treatments):
            return False
        return not self.d_connected(list(treatments), y, z, cut=treatments)

    def adjustment_sets(self, treatments, y):
        """Candidate backdoor sets in the order the official data prefers: {} then single nodes."""
        key = ("adj", treatments, y)
        if key not in self._memo:
            self._memo[key] = [z for z in [()] + [(v,) for v in range(self.n)] if self.backdoor(treatments, y, z)]
        return self._memo[key]

    def mediator_sets(self, x, y):
        if not self.has_indirect_path(x, y):
            return [()]
        key = ("med", x, y)
        if key not in self._memo:
            self._memo[key] = [(m,) for m in sorted(self.desc[x] & self.anc[y]) if self.mediates(m, x, y)]
        return self._memo[key]

    def example_path(self, x, y):
        path = [x]
        while path[-1] != y:
            path.append(next(c for c in self.children[path[-1]] if c == y or y in self.desc[c]))
        return path

# ----------------------------------------------------------------------------- SCM
@dataclass
class SCM:
    """Binary SCM: V = 1 if U_V < cpt[V][pa config] else 0, U_V ~ Uniform(0, 1) independent.
    cpt[v][k] = P(V=1 | parents), k = sum_i pa_i * 2**i over v's parents in order."""
    graph: Graph
    cpt: list
    names: list          # lower-case variable names
    values: list         # (value0, value1) names
    _joint: np.ndarray = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def joint(self):
        if self._joint is None:
            n = self.graph.n
            states = np.arange(2 ** n)
            self._bits = [((states >> v) & 1).astype(bool) for v in range(n)]
            p = np.ones(2 ** n)
            for v in range(n):
                k = sum(self._bits[u].astype(int) << i for i, u in enumerate(self.graph.parents[v]))
                p1 = np.asarray(self.cpt[v])[k] if self.graph.parents[v] else self.cpt[v][0]
                p = p * np.where(self._bits[v], p1, 1 - p1)
            self._joint = p
        return self._joint

    def prob(self, targets, cond=()):
        """P(targets | cond) from the joint distribution; both are ((var, value), ...)."""
        key = (targets, cond)
        if key in self._memo:
            return self._memo[key]
        joint = self.joint()
        mask = np.ones(len(joint), bool)
        for v, val in cond:
            mask &= self._bits[v] == bool(val)
        below = joint[mask].sum()
        for v, val in targets:
            mask &= self._bits[v] == bool(val)
        self._memo[key] = float(joint[mask].sum() / below)
        return self._memo[key]


def sample_scm(rng, n, edge_prob, name_kind):
    """Random DAG on n nodes in topological order (no isolated node) with random CPTs: roots
    P(V=1) in [0.1, 0.9]; other entries u**0.8, u ~ U(0.02, 0.98), skewed towards 1 so that PN and
    PS upper bounds reach 1 about as often as in CaLM base (18 % and 33 % of items)."""
    while True:
        parents = [[u for u in range(v) if rng.random() < edge_prob] for v in range(n)]
        touched = {u for p in parents for u in p} | {v for v in range(n) if parents[v]}
        if len(touched) == n:
            break
    cpt = [[round(rng.uniform(0.1, 0.9), 4)] if not pa else [rng.uniform(0.02, 0.98) ** 0.8 for _ in range(2 ** len(pa))]
           for pa in parents]
    names = sample_names(rng, n, name_kind)
    return SCM(Graph(parents), cpt, [nm for nm, _ in names], [vals for _, vals in names])

# ----------------------------------------------------------------------------- formulas
# Expression trees: ("P", targets, cond) | ("+", *terms) | ("-", a, b) | ("*", *factors)
# | ("/", a, b) | ("min1", e) | ("max0", e) | ("r4", e).

def P(targets, cond=()):
    return ("P", tuple(targets), tuple(cond))


def evaluate(expr, lookup):
    op = expr[0]
    if op == "P":
        return lookup(expr[1], expr[2])
    args = [evaluate(e, lookup) for e in expr[1:]]
    if op == "+":
        return sum(args)
    if op == "-":
        return args[0] - args[1]
    if op == "*":
        out = 1.0
        for a in args:
            out *= a
        return out
    if op == "/":
        return args[0] / args[1]
    return {"min1": lambda v: min(1.0, v), "max0": lambda v: max(0.0, v), "r4": lambda v: round(v, 4)}[op](args[0])


def show(expr, leaf, parent=None):
    """Print an expression; leaf(P-node) gives the text of a probability (symbol or number)."""
    op = expr[0]
    if op == "P":
        return leaf(expr)
    if op in ("min1", "max0", "r4"):
        inner = show(expr[1], leaf)
        return {"min1": f"min{{1, {inner}}}", "max0": f"max{{0, {inner}}}", "r4": f"round({inner}, 4)"}[op]
    sep = {"+": " + ", "-": " - ", "*": " * ", "/": " / "}[op]
    text = sep.join(show(e, leaf, op) for e in expr[1:])
    return f"[{text}]" if parent in ("*", "/", "-") and op in ("+", "-") or parent == "/" and op == "/" else text


def leaves(expr):
    return [expr] if expr[0] == "P" else [lf for e in expr[1:] for lf in leaves(e)]


@dataclass
class Query:
    task: str
    x_var: int
    y_var: int
    x: int            # value X is changed to (counterfactual value for ETT/PN/PS)
    y: int            # outcome value asked about
    xf: int = None    # factual treatment (ETT, PN, PS)
    yf: int = None    # factual outcome (PN, PS)
    w: tuple = ()     # CDE conditioning set ((var, value), ...)
    bound: str = ""   # "upper" / "lower" for PN, PS


def _do(q, y, x, z, extra=()):
    """P(Y=y | do(X=x), extra) = sum_z P(y|x,extra,z) P(z), a tree; r4 of it for PN/PS."""
    if not z:
        return P([(q.y_var, y)], [(q.x_var, x), *extra])
    return ("+", *[("*", P([(q.y_var, y)], [(q.x_var, x), *extra, (z[0], zv)]), P([(z[0], zv)])) for zv in (0, 1)])


def formula(q, z=(), m=()):
    """The expression tree for query q with backdoor set z and mediator set m."""
    X, Y, x, y, x_ = q.x_var, q.y_var, q.x, q.y, 1 - q.x
    zs = [((z[0], zv),) for zv in (0, 1)] if z else [()]
    ms = [((m[0], mv),) for mv in (0, 1)] if m else [()]
    if q.task in ("ATE", "CDE") or q.task == "NDE" and not m:
        def term(zc):
            diff = ("-", P([(Y, y)], [(X, x), *q.w, *zc]), P([(Y, y)], [(X, x_), *q.w, *zc]))
            return ("*", diff, P(zc)) if zc else diff
        return ("+", *[term(zc) for zc in zs]) if z else term(())
    if q.task == "ETT":
        if not z:
            return ("-", P([(Y, y)], [(X, q.xf)]), P([(Y, y)], [(X, x)]))
        return ("-", P([(Y, y)], [(X, q.xf)]), ("+", *[("*", P([(Y, y)], [(X, x), *zc]), P(zc, [(X, q.xf)])) for zc in zs]))
    terms = []
    for zc in zs:
        for mc in ms:
            if q.task == "NDE":
                t = [("-", P([(Y, y)], [*mc, (X, x), *zc]), P([(Y, y)], [*mc, (X, x_), *zc])), P(mc, [(X, x_), *zc])]
            elif q.task == "NIE":
                t = [P([(Y, y)], [*mc, (X, x_), *zc]), ("-", P(mc, [(X, x), *zc]), P(mc, [(X, x_), *zc]))]
            else:  # PN, PS
                return _bound(q, z)
            terms.append(("*", *t, P(zc)) if zc else ("*", *t))
    return ("+", *terms)


def _bound(q, z):
    do = lambda y: ("r4", _do(q, y, q.x, z)) if z else _do(q, y, q.x, z)
    both = P([(q.x_var, q.xf), (q.y_var, q.yf)])
    if q.bound == "upper":
        return ("min1", ("/", ("-", do(q.y), P([(q.x_var, q.x), (q.y_var, q.y)])), both))
    return ("max0", ("/", ("-", P([(q.y_var, q.yf)]), do(q.yf)), both))


def is_zero(q, g):
    """The official zero answer: the structure the quantity needs is absent."""
    if q.task in ("CDE", "NDE"):
        return q.y_var not in g.children[q.x_var]
    if q.task == "NIE":
        return not g.has_indirect_path(q.x_var, q.y_var)
    return not g.has_path(q.x_var, q.y_var)


def candidates(q, g, strict=False):
    """(z, m) pairs to try, preferred first. strict=True (the generator) also asks that z
    deconfounds X -> M and M -> Y (given X), so the mediation formula is the true NDE/NIE."""
    treat = (q.x_var,) + tuple(v for v, _ in q.w)
    ms = g.mediator_sets(q.x_var, q.y_var) if q.task in ("NDE", "NIE") else [()]
    out = []
    for m in ms:
        for z in g.adjustment_sets(treat, q.y_var):
            if m and (m[0] in z or strict and not (g.backdoor((q.x_var,), m[0], z)
                                                   and g.backdoor((m[0],), q.y_var, z + (q.x_var,)))):
                continue
            out.append((z, m))
    return out


def answer_json(task, value):
    """{"ANSWER": "Yes", "PROB": "0.1234"} (PN/PS: {"PROB": ...}); value already rounded."""
    prob = f"{value:.4f}"
    if task in ("PN", "PS"):
        return json.dumps({"PROB": prob})
    yes = value <= -0.001 if task == "ETT" else value >= 0.001
    return json.dumps({"ANSWER": "Yes" if yes else "No", "PROB": prob})


def clean(v):
    v = round(v, 4)
    return 0.0 if v == 0 else v

# ----------------------------------------------------------------------------- statements
class Statements:
    """The probability statements of one problem, in display order, grouped into facts (a
    value and its complement are one fact). lookup() returns a shown number or 1 - a shown
    number: the only arithmetic on raw data that the official labels allow."""

    def __init__(self):
        self.groups, self.table = [], {}

    def add(self, targets, cond, p, group=None):
        self.table[(frozenset(targets), frozenset(cond))] = p
        if group is None:
            self.groups.append([])
            group = len(self.groups) - 1
        self.groups[group].append((tuple(targets), tuple(cond), p))
        return group

    def insert(self, position, targets, cond, p):
        self.table[(frozenset(targets), frozenset(cond))] = p
        self.groups.insert(position, [(tuple(targets), tuple(cond), p)])

    def lookup(self, targets, cond):
        key = (frozenset(targets), frozenset(cond))
        if key in self.table:
            return self.table[key]
        if len(targets) == 1:
            other = (frozenset({(targets[0][0], 1 - targets[0][1])}), key[1])
            if other in self.table:
                return 1.0 - self.table[other]
        raise KeyError(key)

    def facts(self):
        return [f for g in self.groups for f in g]

    def without(self, drop):
        out = Statements()
        for i, g in enumerate(self.groups):
            if i not in drop:
                gi = None
                for t, c, p in g:
                    gi = out.add(t, c, p, gi)
        return out


def first_answer(q, g, store):
    """The solver's decision rule: zero answer, else the first identifying (z, m) whose
    probabilities are all shown, else LACK_CONDITION."""
    if is_zero(q, g):
        return answer_json(q.task, 0.0), None
    for z, m in candidates(q, g):
        try:
            return answer_json(q.task, clean(evaluate(formula(q, z, m), store.lookup))), (z, m)
        except KeyError:
            continue
    return LACK, None

# ----------------------------------------------------------------------------- templates
# Index 0 is the official wording; the others are the "rephrased" variant. The parser reads all.
PREAMBLES = ["Imagine a self-contained, hypothetical world with only the following conditions, and without any "
             "unmentioned factors or causal relationships:",
             "Consider a closed, hypothetical world governed only by the following conditions, with no unmentioned "
             "factors or causal relationships:",
             "Picture an isolated, imaginary world in which only the following conditions hold, with no other "
             "factors or causal relationships:"]
EDGES = ["{a} has a direct effect on {b}.", "{a} directly affects {b}.", "{a} is a direct cause of {b}."]
CONDS = ["For those with {c}, the probability of {t} is {p}.", "Among those with {c}, the chance of {t} is {p}.",
         "Given {c}, the likelihood of {t} is {p}."]
MARGS = ["The probability of {t} is {p}.", "The chance of {t} is {p}.", "The likelihood of {t} is {p}."]
INSTRUCTIONS = ["Consider the {long} ({abbr}) of {X} on {Y}.", "We are interested in the {long} ({abbr}) of {X} on {Y}.",
                "Focus on the {long} ({abbr}) of {X} on {Y}."]
_BOUND = ["Given that {X} was {xf} and {Y} was {yf}, what is the {bound} bound of the probability of the {Y} would "
          "have been {y} if the {X} had been {x}?",
          "Given that {X} was {xf} and {Y} was {yf}, what is the {bound} bound of the probability that {Y} would have "
          "been {y} if the {X} had been {x}?",
          "Knowing that {X} was {xf} and {Y} was {yf}, what is the {bound} bound of the probability that {Y} would "
          "have been {y} had the {X} been {x}?"]
QUESTIONS = {
    "ATE": ["If {X} is changed to be {x}, will {Y} be more likely to be {y}?",
            "If {X} were set to {x}, would {Y} become more likely to be {y}?",
            "Would setting {X} to {x} make {Y} more likely to be {y}?"],
    "CDE": ["Conditioned on {W}, if the {X} had been {x}, would the {Y} have been more likely to be {y}?",
            "Holding {W} fixed, if the {X} had been set to {x}, would the {Y} have been more likely to be {y}?",
            "With {W} fixed by intervention, would setting the {X} to {x} make the {Y} more likely to be {y}?"],
    "ETT": ["For those with {X} being {xf}, if their {X} had been {x}, would the {Y} have been more likely to be {y}?",
            "Among those whose {X} is {xf}, had their {X} been {x}, would the {Y} have been more likely to be {y}?",
            "Take those with {X} being {xf}: if their {X} had instead been {x}, would the {Y} have been more likely "
            "to be {y}?"],
    "NDE": ["Suppose the mediator keeps constant when {X} is changed to be {x}, would the {Y} have been more likely "
            "to be {y}?",
            "If {X} is changed to be {x} while the mediator stays at its original value, would the {Y} have been "
            "more likely to be {y}?",
            "Keeping the mediator fixed at its natural value, if {X} changed to be {x}, would the {Y} have been more "
            "likely to be {y}?"],
    "NIE": ["Suppose {X} is held constant and the mediator changes to whatever value it would have attained under "
            "{X} changing to be {x}, would {Y} have been more likely to be {y}?",
            "If {X} stays fixed but the mediator takes the value it would have under {X} changing to be {x}, would "
            "{Y} have been more likely to be {y}?",
            "Holding {X} constant, let the mediator shift to the value it would take if {X} changed to be {x}: "
            "would {Y} have been more likely to be {y}?"],
    "PN": _BOUND, "PS": _BOUND[1:] + _BOUND[:1]}
PROVIDE = ('Provide the calculation result to four decimal places and a final "yes" or "no" answer in JSON format, '
           'like {"ANSWER": "Yes", "PROB": "0.1234"}:')
PROVIDE_PROB = 'Provide the calculation result to four decimal places in JSON format, like {"PROB": "0.1234"}:'


def _pattern(template, slots):
    """A template -> a full-match regex; a slot seen twice must repeat the same text."""
    out, seen = "", set()
    for part in re.split(r"(\{\w+\})", template):
        name = part[1:-1] if part.startswith("{") else None
        if name is None:
            out += re.escape(part.lower())
        elif name in seen:
            out += f"(?P={name})"
        else:
            seen.add(name)
            out += f"(?P<{name}>{slots.get(name, '.+?')})"
    return re.compile(out)


_NAME = "(?:(?!" + "|".join(re.escape(t[4:-5]) for t in EDGES) + ").)+"   # no verb phrase inside a name
_EDGE_RE = [_pattern(t, {"a": _NAME, "b": _NAME}) for t in EDGES]
_STMT_RE = [_pattern(t.rstrip("."), {"p": r"[01](?:\.\d+)?"}) for t in CONDS + MARGS]


def join_pairs(texts):
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def cap(s):
    return s[:1].upper() + s[1:]

# ----------------------------------------------------------------------------- rendering
def render(scm, q, store, style="base", instruction=True, rng=None):
    """Problem text. style 'base' (CaLM: spaces, plain values) or 'generated' (values carry
    letter codes such as "low (A=0)", no space between edge sentences). A random rng picks
    the rephrased wording; rng=None keeps the official wording."""
    pick = (lambda options: rng.choice(options)) if rng else (lambda options: options[0])
    coded = style == "generated"

    def pair(v, val, code=coded):
        return f"{scm.names[v]} being {scm.values[v][val]}" + (f" ({chr(65 + v)}={val})" if code else "")

    g = scm.graph
    edges = [pick(EDGES).format(a=cap(scm.names[u]), b=scm.names[v]) for u in range(g.n) for v in g.children[u]]
    stmts = []
    for targets, cond, p in store.facts():
        t = join_pairs([pair(v, val) for v, val in targets])
        text = pick(CONDS).format(c=join_pairs([pair(v, val) for v, val in cond]), t=t, p=f"{p:.4f}") if cond \
            else pick(MARGS).format(t=t, p=f"{p:.4f}")
        stmts.append(text)
    X, Y, val = scm.names[q.x_var], scm.names[q.y_var], (lambda v, i: scm.values[v][i])
    slots = dict(X=X, Y=Y, x=val(q.x_var, q.x), y=val(q.y_var, q.y), bound=q.bound,
                 W=join_pairs([pair(v, b, False) for v, b in q.w]) if q.w else "")
    if q.xf is not None:
        slots["xf"] = val(q.x_var, q.xf)
    if q.yf is not None:
        slots["yf"] = val(q.y_var, q.yf)
    sep = " " if style == "base" else ""
    lines = ["Input Info: " + pick(PREAMBLES) + sep + sep.join(edges), " ".join(stmts) + (" " if stmts else "")]
    if instruction:
        lines.append("Instruction: " + pick(INSTRUCTIONS).format(long=LONG_NAME[q.task], abbr=q.task, X=X, Y=Y))
    elif style == "generated":
        lines.append("")   # the official training prompts keep an empty line here
    lines.append("Question: " + pick(QUESTIONS[q.task]).format(**slots))
    lines.append(PROVIDE_PROB if q.task in ("PN", "PS") else PROVIDE)
    return "\n".join(lines)

# ----------------------------------------------------------------------------- parsing
def _key(name):
    """Names are compared without their list separators: the official data writes one name
    both as "(e.g. wind, humidity)" and "(e.g. wind and humidity)"."""
    return _SEPARATOR.sub(" ", name)


_SEPARATOR = re.compile(r", | and ")


def _split_pairs(text, pair_re):
    """'a being low (A=0), b being high and c being x' -> [(name, value, code or None)]."""
    hits = list(pair_re.finditer(text))
    if not hits or hits[0].start() != 0:
        raise ValueError(f"cannot read the variables in {text!r}")
    out = []
    for h, nxt in zip(hits, hits[1:] + [None]):
        value = text[h.end(): nxt.start() if nxt else len(text)].strip()
        m = re.fullmatch(r"(.+?) \(([a-z])=([01])\)", value)
        name = _key(h.group(1))
        out.append((name, m.group(1), int(m.group(3))) if m else (name, value, None))
    return out


def _edge_sentences(text):
    """Split the edge list into template matches. A name may hold a full stop ("e.g."), so
    every split that reads is considered and the one naming the fewest variables wins."""
    read = lambda sent: next((m for r in _EDGE_RE if (m := r.fullmatch(sent))), None)
    fast = [read(sent) for sent in re.split(r"(?<=\.)\s*(?=[A-Z])", text)]
    if text and all(fast):   # the common case: each capitalised sentence reads on its own
        return [(m["a"].lower(), m["b"].lower()) for m in fast]
    text = text.lower()
    pieces = re.split(r"(?<=\.)(\s*)(?=\S)", text)   # sentence, space, sentence, ...

    def reads(i):
        if i >= len(pieces):
            yield []
            return
        for j in range(i, min(len(pieces), i + 8), 2):   # a name holds at most 3 full stops
            m = next((m for r in _EDGE_RE if (m := r.fullmatch("".join(pieces[i:j + 1])))), None)
            if m:
                for rest in reads(j + 2):
                    yield [m] + rest

    options = [opt for _, opt in zip(range(64), reads(0))] if text else [[]]
    if not options:
        raise ValueError(f"cannot read the causal statements {text[:200]!r}")
    best = min(options, key=lambda opt: len({_key(m[k]) for m in opt for k in "ab"}))
    return [(m["a"], m["b"]) for m in best]


@functools.lru_cache(maxsize=256)
def _name_patterns(names):
    """Regexes that only accept this problem's variable names: the pair-list splitter and the
    question templates (a name may contain " to " or " on ", so a free match could misread)."""
    alt = "|".join("(?:, | and )".join(map(re.escape, re.split(", | and ", n)))
                   for n in sorted(names, key=len, reverse=True))
    questions = [(task, _pattern(t, {"bound": "upper|lower", "X": alt, "Y": alt}))
                 for task, ts in QUESTIONS.items() if task != "PS" for t in ts]
    return re.compile(rf"(?:^|, | and )({alt}) being "), questions


def parse(problem):
    """Problem text (either format, any variant, with or without the protocol suffix) ->
    (Graph, Query, Statements, names). Raises ValueError naming what it could not read."""
    if not isinstance(problem, str) or "input info:" not in problem.lower():
        raise ValueError("not a CauGym problem: no 'Input Info:' line")
    first = problem.strip().split("\n")[0]
    lines = [ln.strip() for ln in problem.strip().lower().split("\n")]
    head = first[lines[0].index("input info:") + len("input info:"):]
    if ":" not in head:
        raise ValueError("cannot find the end of the 'Input Info:' preamble")
    names, edges, index = [], [], {}
    for m in _edge_sentences(head[head.index(":") + 1:].strip()):
        for nm in m:
            if _key(nm) not in index:
                index[_key(nm)] = len(names)
                names.append(nm)
        edges.append((index[_key(m[0])], index[_key(m[1])]))
    pair_re, question_res = _name_patterns(tuple(names))
    question = next((ln[len("question:"):].strip() for ln in lines if ln.startswith("question:")), None)
    if question is None:
        raise ValueError("no 'Question:' line")
    instr = next((ln[len("instruction:"):].strip() for ln in lines if ln.startswith("instruction:")), None)
    body = " ".join(ln for ln in lines[1:] if not ln.startswith(("question:", "instruction:", "provide", "let's")))
    raw = []   # (targets, cond, p) with (name, value, code) pairs
    for m in re.finditer(r"\s*(.+? is ([01](?:\.\d+)?))\.?(?=\s|$)", body):
        s = next((s for r in _STMT_RE if (s := r.fullmatch(m.group(1)))), None)
        if not s:
            raise ValueError(f"cannot read the probability statement {m.group(1)!r}")
        cond = _split_pairs(s["c"], pair_re) if "c" in s.groupdict() else []
        raw.append((_split_pairs(s["t"], pair_re), cond, float(s["p"])))
    if re.sub(r"\s*(.+? is ([01](?:\.\d+)?))\.?(?=\s|$)", "", body).strip():
        raise ValueError(f"cannot read the probability statements {body!r}")
    task, qm = next(((t, m) for t, r in question_res if (m := r.fullmatch(question))), (None, None))
    if qm is None:
        raise ValueError(f"cannot read the question {question!r}")
    slots = qm.groupdict()
    raw_x, raw_y = slots["X"], slots["Y"]
    slots["X"], slots["Y"] = _key(raw_x), _key(raw_y)
    for role in ("X", "Y"):
        if slots[role] not in index:
            raise ValueError(f"the question names an unknown variable {slots[role]!r}")
    if instr is not None:
        said = [t for t in TASKS for form in INSTRUCTIONS if _key(instr) == _key(
            form.format(long=LONG_NAME[t], abbr=t, X=raw_x, Y=raw_y).lower())]
        if not said or said[0] != task and {task, said[0]} != {"PN", "PS"}:
            raise ValueError(f"the instruction {instr!r} does not match the question")
        task = said[0]
    # value names -> codes 0/1: letter codes when shown, else order of first appearance
    seen = {}
    pairs = [p for t, c, _ in raw for p in t + c]
    wpairs = _split_pairs(slots["W"], pair_re) if slots.get("W") else []
    X, Y = slots["X"], slots["Y"]
    pairs += wpairs + [(X, slots[k], None) for k in ("x", "xf") if slots.get(k)] + \
        [(Y, slots[k], None) for k in ("y", "yf") if slots.get(k)]
    for nm, value, code in pairs:
        seen.setdefault(nm, {})
        if code is not None:
            if seen[nm].get(value) not in (None, code) or any(v != value and c == code for v, c in seen[nm].items()):
                raise ValueError(f"inconsistent value codes for {nm!r}")
            seen[nm][value] = code
    for nm, value, code in pairs:
        if value not in seen[nm]:
            free = [c for c in (0, 1) if c not in seen[nm].values()]
            if not free:
                raise ValueError(f"variable {nm!r} has more than two values")
            seen[nm][value] = free[0]
    code = lambda nm, value: (index[nm], seen[nm][value])
    store = Statements()
    for t, c, p in raw:
        store.add([code(n, v) for n, v, _ in t], [code(n, v) for n, v, _ in c], p)
    parents = [[u for u, v in edges if v == i] for i in range(len(names))]
    get = lambda k, nm: seen[nm][slots[k]] if slots.get(k) else None
    if task in ("PN", "PS") and instr is None:
        task = "PN" if get("xf", X) == 1 else "PS"
    q = Query(task, index[X], index[Y], get("x", X), get("y", Y), get("xf", X), get("yf", Y),
              tuple(code(n, v) for n, v, _ in wpairs), slots.get("bound") or "")
    if q.xf is not None and q.xf == q.x:
        raise ValueError("the factual and counterfactual treatment values are equal")
    return Graph(parents), q, store, names


def solve(problem):
    """The answer the official data holds for a problem: the answer JSON, or LACK_CONDITION
    when the statements do not identify the quantity. Raises ValueError if it cannot parse."""
    g, q, store, _ = parse(problem)
    try:
        return first_answer(q, g, store)[0]
    except ZeroDivisionError:
        raise ValueError("a probability the formula divides by is 0") from None

# ----------------------------------------------------------------------------- worked solution
def _sym(leaf):
    """P-node -> "P(B=1|A=0,C=1)" (letters in topological order, 0/1 value codes)."""
    show_pairs = lambda pairs: ",".join(f"{chr(65 + v)}={val}" for v, val in pairs)
    return f"P({show_pairs(leaf[1])}" + (f"|{show_pairs(leaf[2])})" if leaf[2] else ")")


def _structure(p):
    """The graph step: why the quantity is (not) zero, and which sets identify it."""
    g, q, L = p.scm.graph, p.q, lambda v: chr(65 + v)
    X, Y = L(q.x_var), L(q.y_var)
    arrow = lambda path: "->".join(L(v) for v in path)
    if q.task in ("CDE", "NDE"):
        found = q.y_var in g.children[q.x_var]
        text = f"The edge {X}->{Y} exists." if found else f"There is no edge {X}->{Y}, so {q.task} = 0."
    elif q.task == "NIE":
        found = g.has_indirect_path(q.x_var, q.y_var)
        path = next((g.example_path(c, q.y_var) for c in g.children[q.x_var] if q.y_var in g.desc[c]), None)
        text = f"There is a directed path through a mediator ({X}->{arrow(path)})." if found else \
            f"No directed path from {X} to {Y} passes through a third node, so NIE = 0."
    else:
        found = g.has_path(q.x_var, q.y_var)
        text = f"There is a directed path {arrow(g.example_path(q.x_var, q.y_var))}, so {X} can affect {Y}." if found \
            else f"There is no directed path from {X} to {Y}, so changing {X} cannot change {Y}: {q.task} = 0."
    steps = [text]
    if not found:
        return steps
    if q.task in ("NDE", "NIE"):
        steps.append(f"Mediator set: {{{L(p.m[0])}}}, on every directed path from {X} to {Y} except {X}->{Y}." if p.m
                     else f"Mediator set: empty, {X}->{Y} is the only directed path.")
    if q.task == "CDE":
        steps.append("Intervene on the conditioning set {" + ",".join(L(v) for v, _ in q.w) + "} as well.")
    z = p.z
    steps.append(f"Backdoor adjustment set: {{{L(z[0])}}}; it is not a descendant of {X} and blocks every "
                 f"backdoor path into {X}." if z else f"Backdoor adjustment set: empty, no backdoor path into {X} "
                 f"is open.")
    return steps


def _arithmetic(tree, look):
    """Numbers substituted, then each top-level operand reduced, then the result."""
    num = lambda leaf: f"{look(leaf[1], leaf[2]):.4f}"
    lines = [show(tree, num)]
    body, wrap = (tree[1], tree[0]) if tree[0] in ("min1", "max0") else (tree, None)
    if body[0] != "P" and any(c[0] != "P" for c in body[1:]):
        sep = {"+": " + ", "-": " - ", "*": " * ", "/": " / "}[body[0]]
        fmt = lambda c, v: (f"{v:.4f}" if c[0] == "P" else f"{v:.6f}") if v >= 0 else f"({v:.6f})"
        parts = sep.join(fmt(c, evaluate(c, look)) for c in body[1:])
        lines.append({"min1": "min{1, %s}", "max0": "max{0, %s}", None: "%s"}[wrap] % parts)
    if wrap:
        lines.append({"min1": "min{1, %.4f}", "max0": "max{0, %.4f}"}[wrap] % evaluate(body, look))
    return lines


def solution(p, tree=None, look=None, value=None, missing=None):
    """The worked answer (SFT target): variables, graph, sets, formula, numbers, arithmetic,
    conclusion, answer JSON. Arguments override the correct reasoning (for the rejected answers
    of DPO): another tree, other numbers (look), another final value, or a claim that the
    statements miss `missing` (leaves) and the answer is LACK_CONDITION."""
    scm, q, L = p.scm, p.q, lambda v: chr(65 + v)
    tree = tree or formula(q, p.z, p.m)
    look = look or p.store.lookup
    used = dict.fromkeys([q.x_var, q.y_var, *(v for v, _ in q.w), *p.m, *p.z])
    steps = ["Variables: " + "; ".join(f"{L(v)} = {scm.names[v]} ({L(v)}=0: {scm.values[v][0]}, {L(v)}=1: "
                                       f"{scm.values[v][1]})" for v in used) + "."]
    x, y = q.x, q.y
    role = (f"Treatment {L(q.x_var)}, outcome {L(q.y_var)}; the question sets {L(q.x_var)}={x} and asks about "
            f"{L(q.y_var)}={y}") + (f", given the factual {L(q.x_var)}={q.xf}" if q.xf is not None else "") + \
        (f" and {L(q.y_var)}={q.yf}" if q.yf is not None else "") + \
        (f", with {' and '.join(f'{L(v)}={b}' for v, b in q.w)}" if q.w else "") + \
        (f"; it asks for the {q.bound} bound" if q.bound else "") + "."
    steps.append(role)
    steps += _structure(p)
    if is_zero(q, scm.graph) and missing is None:
        steps.append(f"So {q.task} = 0.0000, and the answer is No.")
        return _number(steps) + "\n" + answer_json(q.task, 0.0)
    steps.append(f"{q.task} = {show(tree, _sym)}")
    if missing is not None:
        gaps = ", ".join(_sym(leaf) for leaf in missing)
        steps.append(f"The statements give no value for {gaps} (nor its complement), and no other valid "
                     f"adjustment or mediator set is covered by them, so {q.task} cannot be computed from the given "
                     f"conditions.")
        return _number(steps) + "\n" + LACK
    values = []
    for leaf in dict.fromkeys(leaves(tree)):
        v, cond = look(leaf[1], leaf[2]), frozenset(leaf[2])
        shown_as_complement = (frozenset(leaf[1]), cond) not in p.store.table and len(leaf[1]) == 1 and \
            (frozenset({(leaf[1][0][0], 1 - leaf[1][0][1])}), cond) in p.store.table
        values.append(f"{_sym(leaf)} = 1 - {1 - v:.4f} = {v:.4f}" if shown_as_complement else f"{_sym(leaf)} = {v:.4f}")
    steps.append("From the statements: " + "; ".join(values) + ".")
    result = clean(evaluate(tree, look)) if value is None else value
    steps.append(f"{q.task} = " + " = ".join(_arithmetic(tree, look)) + f" = {result:.4f}")
    if q.task in ("PN", "PS"):
        steps.append(f"The {q.bound} bound of {q.task} is {result:.4f}.")
    elif q.task == "ETT":
        yes = result <= -0.001
        steps.append(f"ETT = E[{L(q.y_var)}_(xf) - {L(q.y_var)}_(x) | {L(q.x_var)}={q.xf}] = {result:.4f} "
                     f"{'<=' if yes else '>'} -0.001, so {L(q.y_var)}={y} would {'' if yes else 'not '}have been "
                     f"more likely: the answer is {'Yes' if yes else 'No'}.")
    else:
        yes = result >= 0.001
        steps.append(f"{q.task} = {result:.4f} {'>=' if yes else '<'} 0.001, so the answer is {'Yes' if yes else 'No'}.")
    return _number(steps) + "\n" + answer_json(q.task, result)


def _number(steps):
    return "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))

# ----------------------------------------------------------------------------- generator
BASE_STYLE = ("base", "omitted", "rephrased")


@dataclass
class Problem:
    """One generated item with everything needed to re-derive it (public view: record())."""
    scm: SCM
    q: Query
    z: tuple
    m: tuple
    store: Statements
    variant: str
    style: str
    problem: str = ""
    answer: str = ""
    missing: list = None    # insufficient: the leaves whose statements were removed

    def record(self):
        return {"problem": self.problem, "answer": self.answer, "solution": solution(self, missing=self.missing),
                "type": self.q.task, "variant": self.variant}


def _coin(rng):
    return int(rng.random() < 0.5)


def _pick_query(rng, scm, task, zero, deconfounding):
    """A random (X, Y) question of `task` whose answer is zero or not, and the (z, m) sets the
    data would use; None when this model has no such question."""
    g = scm.graph
    if "pairs" not in scm._memo:   # one shuffled order per model, entered at a random point
        scm._memo["pairs"] = [(a, b) for a in range(g.n) for b in range(g.n) if a != b]
        rng.shuffle(scm._memo["pairs"])
    pairs, start = scm._memo["pairs"], rng.randrange(g.n * (g.n - 1))
    for X, Y in pairs[start:] + pairs[:start]:
        if task in ("PN", "PS"):   # the official data: PN xf=yf=1, x=y=0; PS the reverse
            f = 1 if task == "PN" else 0
            q = Query(task, X, Y, 1 - f, 1 - f, f, f, bound=rng.choice(("upper", "lower")))
        else:
            x = _coin(rng)
            q = Query(task, X, Y, x, _coin(rng), 1 - x if task == "ETT" else None)
        if task == "CDE":
            w = sorted(g.desc[X] & set(g.parents[Y]))
            if not w or rng.random() < 0.2:
                w = sorted(g.desc[X] & g.anc[Y])          # all intermediate nodes
            if not w and zero:
                w = rng.sample([v for v in range(g.n) if v not in (X, Y)], 1)
            if not w:
                continue
            q.w = tuple((v, _coin(rng)) for v in w)
        if is_zero(q, g) != zero:
            continue
        if zero:
            return q, (), ()
        found = candidates(q, g, strict=True)
        if deconfounding and task not in ("PN", "PS") and any(not z for z, _ in found):
            continue
        if found:
            return (q, *found[0])
    return None


def _show_facts(scm, q, z, m, style):
    """Statements for every probability the formula reads, in formula order; the generated
    style also shows the complement of an adjustment variable's distribution (as the data does)."""
    store = Statements()
    for _, targets, cond in leaves(formula(q, z, m)):
        try:
            store.lookup(targets, cond)
            continue
        except KeyError:
            pass
        p = round(scm.prob(targets, cond), 4)
        group = store.add(targets, cond, p)
        if style == "generated" and z and len(targets) == 1 and targets[0][0] == z[0]:
            store.add([(z[0], 1 - targets[0][1])], cond, round(1 - p, 4), group)
    return store


def make_problem(rng, scm, task, variant, style, zero):
    """One item on this model, or None if the model cannot host it."""
    found = _pick_query(rng, scm, task, zero, variant == "deconfounding")
    if found is None:
        return None
    q, z, m = found
    store = Statements() if zero else _show_facts(scm, q, z, m, style)
    missing = None
    if variant == "redundant":       # two true statements no formula of this question reads
        busy = {q.y_var, *z, *m, *(v for v, _ in q.w)}
        pool = [v for v in range(scm.graph.n) if v not in busy]
        added = 0
        for _ in range(40):
            if added == 2 or not pool:
                break
            v = rng.choice(pool)
            pa = scm.graph.parents[v]
            cond = tuple((u, _coin(rng)) for u in pa) if pa and rng.random() < 0.6 else ()
            target = ((v, _coin(rng)),)
            if (frozenset(target), frozenset(cond)) in store.table or \
                    (frozenset({(v, 1 - target[0][1])}), frozenset(cond)) in store.table:
                continue
            store.insert(rng.randint(0, len(store.groups)), target, cond, round(scm.prob(target, cond), 4))
            added += 1
    elif variant == "insufficient":  # two needed facts removed (a value and its complement are one)
        if len(store.groups) < 2:
            return None
        store = store.without(set(rng.sample(range(len(store.groups)), 2)))
        missing = []
        for leaf in leaves(formula(q, z, m)):
            try:
                store.lookup(leaf[1], leaf[2])
            except KeyError:
                missing.append(leaf)
        missing = list(dict.fromkeys(missing))
    answer, _ = first_answer(q, scm.graph, store)
    if (answer == LACK) != (variant == "insufficient"):
        return None
    p = Problem(scm, q, z, m, store, variant, style, answer=answer, missing=missing)
    p.problem = render(scm, q, store, style, instruction=variant != "omitted",
                       rng=rng if variant == "rephrased" else None)
    return p


def _as_list(value, allowed, what):
    items = [value] if isinstance(value, str) else list(value)
    items = [s.strip() for v in items for s in v.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad or items!r}; expected some of {', '.join(allowed)}")
    return items


def _node_range(nodes, variant):
    if nodes is None:
        return (3, 5) if variant in BASE_STYLE else (8, 8)
    if isinstance(nodes, str):
        lo, _, hi = nodes.partition("-")
        nodes = (int(lo), int(hi or lo))
    lo, hi = (nodes, nodes) if isinstance(nodes, int) else tuple(nodes)
    if not 2 <= lo <= hi <= 16:
        raise ValueError(f"nodes must lie in 2..16, got {nodes!r}")
    return lo, hi


def problems(n, tasks=TASKS, variant="base", nodes=None, seed=0, split="train", style=None,
             questions_per_model=20, zero_share=None):
    """n Problem objects (see generate). Item i asks task i % len(tasks), variant cycling over
    the variants; every `questions_per_model` items share one causal model, drawn from the seed
    string f"{split}/{seed}/{k}", so different splits (or seeds) never share a model."""
    tasks, variants = _as_list(tasks, TASKS, "task"), _as_list(variant, VARIANTS, "variant")
    sizes = {v: _node_range(nodes, v) for v in variants}
    out = []
    for i in range(n):
        task, var = tasks[i % len(tasks)], variants[(i // len(tasks)) % len(variants)]
        k = i // questions_per_model
        if i % questions_per_model == 0:
            rng, models = random.Random(f"{split}/{seed}/{k}"), {}
        st = style or ("base" if var in BASE_STYLE else "generated")
        share = zero_share if zero_share is not None else (1 / 3 if var in BASE_STYLE else 0.1)
        zero = task not in ("PN", "PS") and var not in ("insufficient", "deconfounding") and rng.random() < share
        for attempt in range(100):
            key = (sizes[var], attempt)
            if key not in models:   # a model per size; a spare model when one cannot host the item
                mrng = random.Random(f"{split}/{seed}/{k}/{sizes[var]}/{attempt}")
                size = mrng.randint(*sizes[var])
                kind = mrng.choice(("story", "real", "nonsense") if size <= 12 else ("real", "nonsense"))
                models[key] = sample_scm(mrng, size, min(0.6, 3.2 / size), kind)
            item = make_problem(rng, models[key], task, var, st, zero)
            if item is not None:
                out.append(item)
                break
        else:
            raise ValueError(f"cannot make a {task} {var} item on {sizes[var]} nodes")
    return out


def generate(n, tasks=TASKS, variant="base", nodes=None, seed=0, split="train", style=None,
             questions_per_model=20, zero_share=None):
    """n dicts {problem, answer, solution, type, variant}, deterministic in all arguments.
    tasks / variant: a name, a comma list or a list; nodes: int, (lo, hi) or "lo-hi" (default
    3-5 for base/omitted/rephrased, else 8); style: 'base' or 'generated' (default by variant);
    zero_share: share of ATE-NIE items whose answer is 0 (default 1/3 base style, else 0.1)."""
    return [p.record() for p in problems(n, tasks, variant, nodes, seed, split, style, questions_per_model, zero_share)]

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
    from nanocausal.rewards import is_correct
    q, tree = p.q, formula(p.q, p.z, p.m)
    zero = p.answer != LACK and is_zero(q, p.scm.graph)
    if p.answer == LACK:
        guess = lambda t, c: p.store.lookup(t, c) if (frozenset(t), frozenset(c)) in p.store.table or len(t) == 1 \
            and (frozenset({(t[0][0], 1 - t[0][1])}), frozenset(c)) in p.store.table else 0.5
        kinds = {"guess": lambda: solution(p, tree, look=guess)}
    elif zero:
        steps = solution(p).split("\n")[:2]   # variables and roles, then a wrong reading of "no numbers"
        kinds = {"lack": lambda: "\n".join(steps) + f"\nStep 3: The statements give no probabilities for "
                 f"{chr(65 + q.x_var)} and {chr(65 + q.y_var)}, so {q.task} cannot be computed from the given "
                 f"conditions.\n{LACK}"}
    else:
        def arithmetic():
            v = clean(evaluate(tree, p.store.lookup))
            for delta in rng.sample([0.01, -0.01, 0.1, -0.1, 0.002, -0.002, 0.05, -0.05], 8):
                if (0 <= v + delta <= 1) if q.task in ("PN", "PS") else -1 <= v + delta <= 1:
                    return solution(p, value=clean(v + delta))
        swap = {"NDE": "NIE", "NIE": "NDE"}
        kinds = {
            "sign": lambda: None if q.task in ("PN", "PS") else solution(p, (tree[0], tree[2], tree[1])) if
            q.task == "ETT" else solution(p, formula(Query(**{**q.__dict__, "x": 1 - q.x}), p.z, p.m)),
            "formula": lambda: solution(p, _first_terms(tree)),
            "swap": lambda: solution(p, formula(Query(**{**q.__dict__, "task": swap[q.task]}), p.z, p.m))
            if q.task in swap else None,
            "bound": lambda: solution(p, formula(Query(**{**q.__dict__, "bound": "upper" if q.bound == "lower"
                                                          else "lower"}), p.z, p.m)) if q.bound else None,
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

# ----------------------------------------------------------------------------- datasets and CLI
def dataset_rows(items, fmt, seed=0, lack_hint=None):
    """Problems -> JSONL rows with the TRL field names of `fmt` (sft, dpo, kto or rl)."""
    rng = random.Random(f"rejected/{seed}")
    for i, p in enumerate(items):
        prompt = official_prompt(p.problem, p.variant, lack_hint)
        if fmt == "rl":
            yield {"prompt": prompt, "answer": p.answer, "type": p.q.task, "variant": p.variant}
        elif fmt == "sft":
            yield {"prompt": prompt, "completion": solution(p, missing=p.missing)}
        elif fmt == "dpo":
            yield {"prompt": prompt, "chosen": solution(p, missing=p.missing), "rejected": rejected_solution(p, rng)}
        else:   # kto: desirable and undesirable alternate, 1:1
            good = i % 2 == 0
            yield {"prompt": prompt, "completion": solution(p, missing=p.missing) if good else
                   rejected_solution(p, rng), "label": good}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanocausal.scm", description=(
        "Write CauGym-style causal problems as JSONL (sft: prompt/completion, dpo: prompt/chosen/rejected, "
        "kto: prompt/completion/label, rl: prompt/answer/type/variant), or solve problems from a file."))
    ap.add_argument("--format", choices=("sft", "dpo", "kto", "rl"), default="sft", help="dataset layout")
    ap.add_argument("--n", type=int, default=1000, help="number of items")
    ap.add_argument("--out", default="-", help="output JSONL path ('-' = stdout)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks, e.g. ATE,PN")
    ap.add_argument("--variant", default="base", help=f"comma list of variants: {', '.join(VARIANTS)}")
    ap.add_argument("--nodes", default=None, help="graph size: N or LO-HI (default 3-5 base style, else 8)")
    ap.add_argument("--style", choices=("base", "generated"), default=None, help="text format (default by variant)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--split", default="train", help="split name; different splits never share a causal model")
    ap.add_argument("--questions-per-model", type=int, default=20, help="questions asked of each causal model")
    ap.add_argument("--zero-share", type=float, default=None, help="share of ATE-NIE items with answer 0")
    ap.add_argument("--lack-hint-all", action="store_true", help="add the LACK_CONDITION hint to every prompt")
    ap.add_argument("--solve", metavar="PATH", help="solve the problems in a .json/.jsonl file (key problem or "
                    "prompt) and print one answer per line")
    args = ap.parse_args(argv)
    if args.solve:
        try:
            text = open(args.solve).read()
        except OSError as e:
            ap.error(f"cannot read {args.solve}: {e.strerror}")
        try:
            data = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            ap.error(f"{args.solve}: not JSON or JSONL ({e.msg}, line {e.lineno})")
        for i, row in enumerate(data):
            try:
                print(solve(row.get("problem", row.get("prompt")) if isinstance(row, dict) else row))
            except ValueError as e:
                ap.error(f"{args.solve}: item {i}: {e}")
        return
    try:
        items = problems(args.n, args.tasks, args.variant, args.nodes, args.seed, args.split, args.style,
                         args.questions_per_model, args.zero_share)
    except ValueError as e:
        ap.error(str(e))
    try:
        out = sys.stdout if args.out == "-" else open(args.out, "w")
    except OSError as e:
        ap.error(f"cannot write {args.out}: {e.strerror}")
    for row in dataset_rows(items, args.format, args.seed, True if args.lack_hint_all else None):
        out.write(json.dumps(row) + "\n")
    if out is not sys.stdout:
        out.close()
        print(f"wrote {len(items)} {args.format} rows to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
