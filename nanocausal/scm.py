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
        return [z for z in [()] + [(v,) for v in range(self.n)] if self.backdoor(treatments, y, z)]

    def mediator_sets(self, x, y):
        if not self.has_indirect_path(x, y):
            return [()]
        return [(m,) for m in sorted(self.desc[x] & self.anc[y]) if self.mediates(m, x, y)]

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
        joint = self.joint()
        mask = np.ones(len(joint), bool)
        for v, val in cond:
            mask &= self._bits[v] == bool(val)
        below = joint[mask].sum()
        for v, val in targets:
            mask &= self._bits[v] == bool(val)
        return float(joint[mask].sum() / below)


def sample_scm(rng, n, edge_prob, name_kind):
    """Random DAG on n nodes in topological order (no isolated node) with random CPTs."""
    while True:
        parents = [[u for u in range(v) if rng.random() < edge_prob] for v in range(n)]
        touched = {u for p in parents for u in p} | {v for v in range(n) if parents[v]}
        if len(touched) == n:
            break
    cpt = [[round(rng.uniform(0.1, 0.9), 4)] if not pa else [rng.uniform(0.02, 0.98) for _ in range(2 ** len(pa))]
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


_Q_RE = [(task, _pattern(t, {"bound": "upper|lower"})) for task, ts in QUESTIONS.items() if task != "PS" for t in ts]
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
    return re.sub(r", | and ", " ", name)


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
    return min(options, key=lambda opt: len({_key(m[k]) for m in opt for k in "ab"}))


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
    for m in _edge_sentences(head[head.index(":") + 1:].strip().lower()):
        for nm in (m["a"], m["b"]):
            if _key(nm) not in index:
                index[_key(nm)] = len(names)
                names.append(nm)
        edges.append((index[_key(m["a"])], index[_key(m["b"])]))
    alt = "|".join("(?:, | and )".join(map(re.escape, re.split(", | and ", n)))
                   for n in sorted(names, key=len, reverse=True))
    pair_re = re.compile(rf"(?:^|, | and )({alt}) being ")
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
    task, qm = next(((t, m) for t, r in _Q_RE if (m := r.fullmatch(question))), (None, None))
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
