"""The causal engine: a structural causal model (SCM) over binary variables, its graph, and the
formulas of the seven CauGym questions as expression trees, with the rules that pick them.

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
P(y|do(x)) to 4 decimals first. A formula is an expression tree of tuples: probability leaves
("P", targets, cond), built by `prob`, under the operator nodes "+", "-", "*", "/" and the
clamps and rounding "min1", "max0", "r4". The same tree is evaluated (`value_of`), printed
symbolically and printed with numbers (`show`), so the generator, the solver and the worked
solution can never disagree.

The problem modules (README's "What is inside") each import only those before them:
caugym -> scm -> problem_text -> solutions -> problems.
"""
import json
import math
from dataclasses import dataclass, field

import numpy as np

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
    # sorted first: a set's order follows Python's per-process string hashing (PYTHONHASHSEED), and
    # the random keys below must go to the same names in every process (--resume, eval sets)
    return [(name, rng.choice(VALUE_PAIRS)) for name in sorted(sorted(names), key=lambda s: rng.random())]

# ----------------------------------------------------------------------------- graph
def letter(v):
    """Node v's letter, in worked solutions and in the letter codes of the text: 0 -> "A", 1 -> "B"."""
    return chr(65 + v)


class Graph:
    """A DAG over nodes 0..n-1 given by parent tuples (node i's letter is letter(i))."""

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
    _memo: dict = field(default_factory=dict, repr=False)   # prob()'s cache; the generator's question order

    def joint(self):
        """P(state) for all 2**n states; bit v of a state is node v's value."""
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


def size_range(nodes):
    """(lo, hi) graph sizes from an int, a (lo, hi) pair or the text "N" / "LO-HI"; sizes lie in 2..16."""
    if isinstance(nodes, str):
        lo, _, hi = nodes.partition("-")
        if not (lo.strip().isdigit() and (hi or lo).strip().isdigit()):
            raise ValueError(f"nodes must be N or LO-HI (graph sizes in 2..16), got {nodes!r}")
        nodes = (int(lo), int(hi or lo))
    lo, hi = (nodes, nodes) if isinstance(nodes, int) else tuple(nodes)
    if not 2 <= lo <= hi <= 16:
        raise ValueError(f"nodes must lie in 2..16, got {nodes!r}")
    return lo, hi


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
def prob(targets, cond=()):
    """The leaf P(targets | cond) of a formula; both are ((var, value), ...)."""
    return ("P", tuple(targets), tuple(cond))


OPERATORS = {"+": sum, "-": lambda args: args[0] - args[1], "*": math.prod, "/": lambda args: args[0] / args[1],
             "min1": lambda args: min(1.0, args[0]), "max0": lambda args: max(0.0, args[0]),
             "r4": lambda args: round(args[0], 4)}   # each takes the list of its operands' values
CLAMPS = {"min1": "min{{1, {}}}", "max0": "max{{0, {}}}", "r4": "round({}, 4)"}   # how show() prints them


def value_of(expr, lookup):
    """The number an expression stands for; lookup(targets, cond) gives each probability leaf."""
    if expr[0] == "P":
        return lookup(expr[1], expr[2])
    return OPERATORS[expr[0]]([value_of(e, lookup) for e in expr[1:]])


def show(expr, leaf, parent=None):
    """Print an expression; leaf(P-node) gives the text of a probability (symbol or number)."""
    op = expr[0]
    if op == "P":
        return leaf(expr)
    if op in CLAMPS:
        return CLAMPS[op].format(show(expr[1], leaf))
    text = f" {op} ".join(show(e, leaf, op) for e in expr[1:])
    return f"[{text}]" if parent in ("*", "/", "-") and op in ("+", "-") or parent == "/" and op == "/" else text


def leaves(expr):
    """The probability leaves of an expression, left to right (with repeats)."""
    return [expr] if expr[0] == "P" else [lf for e in expr[1:] for lf in leaves(e)]


@dataclass
class Query:
    """One question about a model: task, treatment X (x_var), outcome Y (y_var) and their values."""
    task: str
    x_var: int
    y_var: int
    x: int            # value X is changed to (counterfactual value for ETT/PN/PS)
    y: int            # outcome value asked about
    xf: int = None    # factual treatment (ETT, PN, PS)
    yf: int = None    # factual outcome (PN, PS)
    w: tuple = ()     # CDE conditioning set ((var, value), ...)
    bound: str = ""   # "upper" / "lower" for PN, PS


def formula(q, z=(), m=()):
    """The expression tree for query q with backdoor set z and mediator set m."""
    X, Y, x, y, x_ = q.x_var, q.y_var, q.x, q.y, 1 - q.x
    zs = [((z[0], zv),) for zv in (0, 1)] if z else [()]
    ms = [((m[0], mv),) for mv in (0, 1)] if m else [()]
    if q.task in ("ATE", "CDE") or q.task == "NDE" and not m:
        def term(zc):
            diff = ("-", prob([(Y, y)], [(X, x), *q.w, *zc]), prob([(Y, y)], [(X, x_), *q.w, *zc]))
            return ("*", diff, prob(zc)) if zc else diff
        return ("+", *[term(zc) for zc in zs]) if z else term(())
    if q.task in ("PN", "PS"):
        return _bound_formula(q, z)
    if q.task == "ETT":
        if not z:
            return ("-", prob([(Y, y)], [(X, q.xf)]), prob([(Y, y)], [(X, x)]))
        return ("-", prob([(Y, y)], [(X, q.xf)]),
                ("+", *[("*", prob([(Y, y)], [(X, x), *zc]), prob(zc, [(X, q.xf)])) for zc in zs]))
    terms = []
    for zc in zs:
        for mc in ms:
            if q.task == "NDE":
                t = [("-", prob([(Y, y)], [*mc, (X, x), *zc]), prob([(Y, y)], [*mc, (X, x_), *zc])),
                     prob(mc, [(X, x_), *zc])]
            else:  # NIE
                t = [prob([(Y, y)], [*mc, (X, x_), *zc]), ("-", prob(mc, [(X, x), *zc]), prob(mc, [(X, x_), *zc]))]
            terms.append(("*", *t, prob(zc)) if zc else ("*", *t))
    return ("+", *terms)


def _bound_formula(q, z):
    """The PN/PS bound of q (module docstring); P(y|do(x)) = sum_z P(y|x,z) P(z) is rounded to 4
    decimals when adjusted."""
    def do(y):
        if not z:
            return prob([(q.y_var, y)], [(q.x_var, q.x)])
        return ("r4", ("+", *[("*", prob([(q.y_var, y)], [(q.x_var, q.x), (z[0], zv)]), prob([(z[0], zv)]))
                              for zv in (0, 1)]))
    both = prob([(q.x_var, q.xf), (q.y_var, q.yf)])
    if q.bound == "upper":
        return ("min1", ("/", ("-", do(q.y), prob([(q.x_var, q.x), (q.y_var, q.y)])), both))
    return ("max0", ("/", ("-", prob([(q.y_var, q.yf)]), do(q.yf)), both))


def is_zero(q, g):
    """The official zero answer: the structure the quantity needs is absent."""
    if q.task in ("CDE", "NDE"):
        return q.y_var not in g.children[q.x_var]
    if q.task == "NIE":
        return not g.has_indirect_path(q.x_var, q.y_var)
    return q.y_var not in g.desc[q.x_var]


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
    shown = f"{value:.4f}"
    if task in ("PN", "PS"):
        return json.dumps({"PROB": shown})
    yes = value <= -0.001 if task == "ETT" else value >= 0.001
    return json.dumps({"ANSWER": "Yes" if yes else "No", "PROB": shown})


def round_answer(v):
    """v rounded to the 4 decimals an answer shows, with -0.0 written as 0.0."""
    v = round(v, 4)
    return 0.0 if v == 0 else v

