"""The text of a CauGym problem: the probability statements it shows, the sentence templates of
both official formats, rendering a model and a query as text (`render`), reading such a text back
(`parse`) and answering it exactly (`solve`, the symbolic solver).

The solver reads only what the text shows (`Statements`: the problem's 4-decimal numbers), and
`first_answer` is the decision rule the solver and the generator share. Index 0 of every template
list is the official wording, the others are the "rephrased" variant; the parser reads them all,
in either text format.
"""
import functools
import re

from nanocausal.caugym import LACK, TASKS
from nanocausal.scm import Graph, Query, answer_json, candidates, formula, is_zero, letter, round_answer, value_of

# ----------------------------------------------------------------------------- statements
class Statements:
    """The probability statements of one problem, in display order, grouped into facts (a
    value and its complement are one fact). lookup() returns a shown number or 1 - a shown
    number: the only arithmetic on raw data that the official labels allow."""

    def __init__(self):
        self.groups, self.table = [], {}
        self.unreadable = []  # sentences of a parsed problem that were no readable statement

    def add(self, targets, cond, p, group=None, at=None):
        """Append P(targets | cond) = p to fact `group`, or (group None) make it a new fact, at
        position `at` of the display order (None: last); returns the group."""
        self.table[(frozenset(targets), frozenset(cond))] = p
        if group is None:
            group = len(self.groups) if at is None else at
            self.groups.insert(group, [])
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

    def shows(self, targets, cond):
        """Whether lookup() finds P(targets | cond): it, or its complement, is shown."""
        try:
            return self.lookup(targets, cond) is not None
        except KeyError:
            return False

    def facts(self):
        """Every statement (targets, cond, p), in display order."""
        return [f for g in self.groups for f in g]

    def without(self, drop):
        """A copy without the facts whose indices are in `drop`."""
        out = Statements()
        out.groups = [list(g) for i, g in enumerate(self.groups) if i not in drop]
        out.table = {(frozenset(t), frozenset(c)): p for t, c, p in out.facts()}
        return out


def first_answer(q, g, store):
    """The solver's decision rule: zero answer, else the first identifying (z, m) whose
    probabilities are all shown, else LACK_CONDITION; (answer, the formula it used or None)."""
    if is_zero(q, g):
        return answer_json(q.task, 0.0), None
    for z, m in candidates(q, g):
        tree = formula(q, z, m)
        try:
            return answer_json(q.task, round_answer(value_of(tree, store.lookup))), tree
        except KeyError:
            continue
    return LACK, None

# ----------------------------------------------------------------------------- templates
LONG_NAME = {"ATE": "average treatment effect", "CDE": "controlled direct effect",    # for the Instruction line
             "ETT": "effect of treatment on the treated", "NDE": "natural direct effect",
             "NIE": "natural indirect effect", "PN": "probability of necessity",
             "PS": "probability of sufficiency"}
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
    """["a"] -> "a"; ["a", "b", "c"] -> "a, b and c"."""
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


# ----------------------------------------------------------------------------- rendering
def render(scm, q, store, style="base", instruction=True, rng=None):
    """Problem text. style 'base' (CaLM: spaces, plain values) or 'generated' (values carry
    letter codes such as "low (A=0)", no space between edge sentences). A random rng picks
    the rephrased wording; rng=None keeps the official wording."""
    pick = rng.choice if rng else (lambda options: options[0])
    coded = style == "generated"

    def pair(v, val, code=coded):
        return f"{scm.names[v]} being {scm.values[v][val]}" + (f" ({letter(v)}={val})" if code else "")

    g = scm.graph
    edges = [pick(EDGES).format(a=scm.names[u][:1].upper() + scm.names[u][1:], b=scm.names[v])
             for u in range(g.n) for v in g.children[u]]
    stmts = []
    for targets, cond, p in store.facts():
        t = join_pairs([pair(v, val) for v, val in targets])
        text = pick(CONDS).format(c=join_pairs([pair(v, val) for v, val in cond]), t=t, p=f"{p:.4f}") if cond \
            else pick(MARGS).format(t=t, p=f"{p:.4f}")
        stmts.append(text)
    X, Y, x_values, y_values = scm.names[q.x_var], scm.names[q.y_var], scm.values[q.x_var], scm.values[q.y_var]
    slots = dict(X=X, Y=Y, x=x_values[q.x], y=y_values[q.y], bound=q.bound,
                 xf=None if q.xf is None else x_values[q.xf], yf=None if q.yf is None else y_values[q.yf],
                 W=join_pairs([pair(v, b, False) for v, b in q.w]) if q.w else "")
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
def _name_key(name):
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
        name = _name_key(h.group(1))
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
            m = read("".join(pieces[i:j + 1]))
            if m:
                for rest in reads(j + 2):
                    yield [m] + rest

    options = [opt for _, opt in zip(range(64), reads(0))] if text else [[]]
    if not options:
        raise ValueError(f"cannot read the causal statements {text[:200]!r}")
    best = min(options, key=lambda opt: len({_name_key(m[k]) for m in opt for k in "ab"}))
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


_STATEMENT_SENTENCE = r"\s*(.+? is ([01](?:\.\d+)?))\.?(?=\s|$)"  # "... is 0.1234." (one probability statement)


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
            if _name_key(nm) not in index:
                index[_name_key(nm)] = len(names)
                names.append(nm)
        edges.append((index[_name_key(m[0])], index[_name_key(m[1])]))
    pair_re, question_res = _name_patterns(tuple(names))
    after = lambda label: next((ln[len(label):].strip() for ln in lines if ln.startswith(label)), None)
    question, instr = after("question:"), after("instruction:")
    if question is None:
        raise ValueError("no 'Question:' line")
    body = " ".join(ln for ln in lines[1:] if not ln.startswith(("question:", "instruction:", "provide", "let's")))
    raw = []   # (targets, cond, p) with (name, value, code) pairs
    # A sentence that is no probability statement we can read is skipped, not fatal: the official
    # redundant set has an item with a truncated one ("lightning) being necessary (D=1) is 0.4064.")
    # whose question needs none of it. solve() says so if the answer needed it after all.
    store = Statements()  # (store.unreadable lists those sentences; the statements come below)
    for m in re.finditer(_STATEMENT_SENTENCE, body):
        s = next((s for r in _STMT_RE if (s := r.fullmatch(m.group(1)))), None)
        if not s:
            store.unreadable.append(m.group(1))
            continue
        cond = _split_pairs(s["c"], pair_re) if "c" in s.groupdict() else []
        raw.append((_split_pairs(s["t"], pair_re), cond, float(s["p"])))
    leftover = re.sub(_STATEMENT_SENTENCE, "", body).strip()
    if leftover:
        store.unreadable.append(leftover)
    task, qm = next(((t, m) for t, r in question_res if (m := r.fullmatch(question))), (None, None))
    if qm is None:
        raise ValueError(f"cannot read the question {question!r}")
    slots = qm.groupdict()
    X, Y = _name_key(slots["X"]), _name_key(slots["Y"])
    for name in (X, Y):
        if name not in index:
            raise ValueError(f"the question names an unknown variable {name!r}")
    if instr is not None:
        said = [t for t in TASKS for form in INSTRUCTIONS if _name_key(instr) == _name_key(
            form.format(long=LONG_NAME[t], abbr=t, X=slots["X"], Y=slots["Y"]).lower())]
        if not said or said[0] != task and {task, said[0]} != {"PN", "PS"}:
            raise ValueError(f"the instruction {instr!r} does not match the question")
        task = said[0]
    # value names -> codes 0/1: letter codes when shown, else order of first appearance
    pairs = [p for t, c, _ in raw for p in t + c]
    wpairs = _split_pairs(slots["W"], pair_re) if slots.get("W") else []
    pairs += wpairs + [(X, slots[k], None) for k in ("x", "xf") if slots.get(k)] + \
        [(Y, slots[k], None) for k in ("y", "yf") if slots.get(k)]
    seen = {nm: {} for nm, _, _ in pairs}   # name -> {value: code}
    for nm, value, code in pairs:
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
        answer = first_answer(q, g, store)[0]
    except ZeroDivisionError:
        raise ValueError("a probability the formula divides by is 0") from None
    if answer == LACK and store.unreadable:
        raise ValueError(f"the problem lacks a probability the answer needs, and these sentences could not be "
                         f"read: {'; '.join(store.unreadable)}")
    return answer

