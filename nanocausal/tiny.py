"""The "tiny" preset: a causal-reasoning task, tokenizer and model small enough to post-train on
a laptop CPU in minutes, saved as an ordinary Hugging Face folder so that every script runs it
through exactly the code path of a real checkpoint (config.json + model.safetensors +
tokenizer.json + a ChatML chat template).

The curriculum. Real CauGym problems (../shared/docs/causal_tasks.md) ask seven questions about
3-10 node graphs. A sub-million-parameter model cannot learn that in minutes, so the tiny
curriculum keeps one question, the average treatment effect (ATE), on 3-node graphs, in the
official base wording, with two kinds of item:

- "effect": X causes Y and no adjustment is needed, so the problem shows P(y|x) and P(y|x') (in
  that order: easy_order; official problems use either order) and
      ATE = P(y|x) - P(y|x')
  a subtraction of two shown 4-decimal numbers;
- "no path": there is no directed path X -> ... -> Y, the problem shows no numbers, and the
  answer is {"ANSWER": "No", "PROB": "0.0000"}.

make_problem adds a second query type (ETT: the subtraction the other way round) and the test
variants of CauGym, as held-out tests of what the model learned.

The problems are genuine CauGym problems: nanocausal.problem_text.solve parses them and returns
the same answer, in every variant (tests/test_tiny.py checks it), and eval.py scores them with
the official rule (`python eval.py --data tiny:200 tiny-redundant:100 ...`).

The worked solution. A small transformer does not learn to state a 4-digit difference in one
go (issue 7: 7 minutes of SFT never got one exactly right), but it does learn the school method,
one column at a time from the right, each column written as "top - borrow - bottom = digit",
with the top digit already raised by 10 when the column borrows:

    path: yes
    ATE = 0.8445 - 0.9288 = -(0.9288 - 0.8445)
    8-0-5=3 8-0-4=4 12-0-4=8 9-1-8=0
    = -0.0843
    {"ANSWER": "No", "PROB": "-0.0843"}

(columns right to left: 8-5=3; 8-4=4; 2<4 so 12-4=8, borrowing; 9-1-8=0.) Every digit of the
answer is then produced by a one-digit operation whose inputs sit a few tokens back.

A careless teacher (solution(item, slip_rate, rng)) forgets each borrow it owes with probability
slip_rate, writing "9-0-8=1" for "9-1-8=0", and carries the wrong result into its final answer:
demonstrations with the kind of systematic mistake SFT imitates and an outcome reward does not.

The tokenizer, the model and its pretraining are built by nanocausal/tiny_base.py
(`python build_tiny_base.py`).
"""
import json
import random

from nanocausal.caugym import LACK
from nanocausal.problem_text import CONDS, EDGES, INSTRUCTIONS, LONG_NAME, MARGS, PREAMBLES, PROVIDE, QUESTIONS
from nanocausal.scm import Graph, answer_json, round_answer

TINY_NAMES = ["smku", "eons", "arbu", "pgqh", "ahpi", "lsrx", "imah", "ojko", "wexo", "qlun",
              "dovr", "fibe", "tazu", "kryp", "mulo", "gesh", "vunt", "yelb", "niqo", "hast"]
# Held-out wording (the "rephrased" variant of the go-beyond experiment): same problems, other words.
PREAMBLE_REPHRASED = ("Input Info: Consider an isolated, imaginary world where only these conditions hold, "
                      "with no other factors or causal links: ")
KINDS = ("effect", "no path")
QUERIES = ("ATE", "ETT")
VARIANTS = ("base", "rephrased", "omitted", "redundant", "insufficient", "varied", "heldout")
TRAIN_WORDINGS, HELDOUT_WORDING = (0, 1), 2  # indices into the engine's templates (problem_text.PREAMBLES, ...)

# ----------------------------------------------------------------------------- problems


def make_problem(rng, no_path_share=0.375, variant="base", easy_order=True, query="ATE"):
    """One tiny-curriculum item: dict(problem, answer, type, kind, variant, numbers), where numbers
    = (a, b) are the two shown probabilities the answer is a - b of (None without a path).

    query: "ATE" (module docstring) or "ETT", the effect of treatment on the treated on the same
    unconfounded graphs, E[Y_xf - Y_x | X = xf] = P(y|xf) - P(y|x) (factual minus counterfactual,
    ../shared/docs/causal_tasks.md). Both list the statement of the value the question names (ATE:
    "changed to x", ETT: "had been x") first, so ATE is first - second and ETT second - first: the
    query type decides the order of the subtraction.

    variant (the test variants of nanocausal.caugym, built as nanocausal.problems builds them):
      base / rephrased  the official wording / held-out wording (PREAMBLE_REPHRASED, other questions);
      omitted           no "Instruction:" line (the question alone says what is asked);
      redundant         one more true statement that no formula of the question reads: the third
                        node's probability, given one of its parents if it has one, at a random place;
      insufficient      an effect item with one of its two needed statements removed: the answer is
                        LACK_CONDITION (the prompt then carries the official hint, caugym.official_prompt);
      varied            the varied training curriculum: every sentence (preamble, edges, statements,
                        instruction, question) in one of the engine's wordings TRAIN_WORDINGS (0: the
                        official one, 1: its first rephrasing), drawn sentence by sentence, and the
                        Instruction line left out one time in four;
      heldout           every sentence in the engine's wording HELDOUT_WORDING, which "varied" never uses:
                        the generalisation test of a model trained on the varied curriculum.
    The base and rephrased variants draw exactly the random numbers they always did, so the tiny
    base's pretraining data stays what it was."""
    # the engine's template index of each sentence: base-like variants always 0 (no random draw)
    pick = (lambda: rng.choice(TRAIN_WORDINGS)) if variant == "varied" else \
        (lambda: HELDOUT_WORDING) if variant == "heldout" else (lambda: 0)
    if variant not in VARIANTS:
        raise ValueError(f"tiny variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if variant == "insufficient":
        no_path_share = 0.0  # a problem without a path needs no numbers, so it cannot lack them
    names = rng.sample(TINY_NAMES, 3)
    while True:  # a random DAG over 3 nodes in topological order; every node on some edge (as CauGym)
        edges = [(i, j) for i in range(3) for j in range(i + 1, 3) if rng.random() < 0.6]
        if {v for e in edges for v in e} == {0, 1, 2}:
            break
    graph = Graph([[a for a, b in edges if b == v] for v in range(3)])
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    want_path = rng.random() >= no_path_share
    # An effect needs a directed path and no confounder (no third node W with W -> X and W -> Y),
    # so that the empty set is a valid adjustment set and ATE = P(y|x) - P(y|x').
    ok = [(a, b) for a, b in pairs if (b in graph.desc[a]) == want_path
          and not any((w, a) in edges and (w, b) in edges for w in range(3))]
    if not ok:
        return make_problem(rng, no_path_share, variant, easy_order, query)
    x, y = rng.choice(ok)
    x_value, y_value = rng.choice(["low", "high"]), rng.choice(["low", "high"])
    other = "high" if x_value == "low" else "low"
    edge_text = " ".join(EDGES[pick()].format(a=names[a][0].upper() + names[a][1:], b=names[b]) for a, b in edges)
    statements = []
    if want_path:
        p_x, p_other = rng.randint(1, 9999) / 10000, rng.randint(1, 9999) / 10000
        # Easy curriculum: the statement of the value the question names comes first (official
        # problems list them in either order).
        shown = [(x_value, p_x), (other, p_other)]
        if not easy_order:
            rng.shuffle(shown)
        statements = [CONDS[pick()].format(c=f"{names[x]} being {v}", t=f"{names[y]} being {y_value}", p=f"{p:.4f}")
                      for v, p in shown]
        numbers = (p_x, p_other) if query == "ATE" else (p_other, p_x)
        answer = answer_json(query, round_answer(numbers[0] - numbers[1]))  # the engine's Yes rule of each query
    else:
        numbers, answer = None, answer_json(query, 0.0)
    if variant == "redundant":
        w = 3 - x - y
        parents = graph.parents[w]
        given = f"{names[rng.choice(parents)]} being {rng.choice(['low', 'high'])}" if parents else None
        statements.insert(rng.randint(0, len(statements)), (CONDS[0] if given else MARGS[0]).format(
            c=given, t=f"{names[w]} being {rng.choice(['low', 'high'])}", p=f"{rng.randint(1, 9999) / 10000:.4f}"))
    elif variant == "insufficient":
        statements.pop(rng.randrange(2))
        answer = LACK
    stats = " ".join(statements) + " " if statements else ""
    rephrased = variant == "rephrased"
    preamble = PREAMBLE_REPHRASED if rephrased else f"Input Info: {PREAMBLES[pick()]} "
    instruction = INSTRUCTIONS[pick()].format(long=LONG_NAME[query], abbr=query, X=names[x], Y=names[y])
    # the toy's own rephrasing ("rephrased") asks ATE in the engine's wording 2 and ETT in its wording 1
    question = QUESTIONS[query][{"ATE": 2, "ETT": 1}[query] if rephrased else pick()].format(
        X=names[x], x=x_value, Y=names[y], y=y_value, xf=other)
    omit = variant == "omitted" or (variant == "varied" and rng.random() < 0.25)
    instruction_line = "" if omit else f"Instruction: {instruction}\n"
    problem = f"{preamble}{edge_text}\n{stats}\n{instruction_line}Question: {question}\n{PROVIDE}"
    return {"problem": problem, "answer": answer, "type": query, "kind": "effect" if want_path else "no path",
            "variant": variant, "numbers": numbers}


def make_problems(n, seed, variant="base", queries=("ATE",)):
    """n items from one seeded stream; with several queries each item draws its own (one query
    draws nothing, so the ATE-only stream is what it always was)."""
    rng = random.Random(seed)
    return [make_problem(rng, variant=variant, query=rng.choice(queries) if len(queries) > 1 else queries[0])
            for _ in range(n)]


def subtraction_columns(a, b, forget_borrow=lambda: False):
    """a - b for two 4-decimal numbers in [0, 1), by the school method on the larger minus the
    smaller, right to left: ["18-0-5=3", ...] (top digit raised by 10 when the column borrows) and
    the signed result ("-0.0843" when a < b).

    forget_borrow() is asked at every column that owes a borrow; when it says True the column
    forgets it ("9-0-8=1" instead of "9-1-8=0"), the classic slip of a careless teacher."""
    top_digits, bottom_digits = f"{max(a, b):.4f}"[2:], f"{min(a, b):.4f}"[2:]
    columns, result, borrow = [], [], 0
    for top, bottom in zip(map(int, reversed(top_digits)), map(int, reversed(bottom_digits))):
        if borrow and forget_borrow():
            borrow = 0
        borrow_out = int(top - borrow < bottom)
        digit = top + 10 * borrow_out - borrow - bottom
        columns.append(f"{top + 10 * borrow_out}-{borrow}-{bottom}={digit}")
        result.append(str(digit))
        borrow = borrow_out
    magnitude = "0." + "".join(reversed(result))
    return columns, magnitude if a >= b or magnitude == "0.0000" else "-" + magnitude


def solution(item, slip_rate=0.0, rng=None):
    """The worked solution of a tiny-curriculum item (module docstring), by the careless teacher
    when slip_rate > 0 (each borrow owed forgotten with that probability, drawn from rng)."""
    answer = json.loads(item["answer"])
    if item["numbers"] is None:
        return "path: no\n" + json.dumps(answer)
    forget_borrow = (lambda: rng.random() < slip_rate) if slip_rate > 0 else (lambda: False)
    a, b = item["numbers"]  # the answer is a - b
    columns, result = subtraction_columns(a, b, forget_borrow)
    if slip_rate == 0:
        assert float(result) == float(answer["PROB"]), (result, answer)
    answer["PROB"] = result
    return f"path: yes\n{item['type']} = {difference(a, b)}\n{' '.join(columns)}\n= {result}\n{json.dumps(answer)}"


def difference(a, b):
    """The head of a worked a - b: "a - b", then "= -(b - a)" when the columns subtract the other way round."""
    return f"{a:.4f} - {b:.4f}" + ("" if a >= b else f" = -({b:.4f} - {a:.4f})")
