"""The problem generator, its datasets and its command line.

`problems(n, ...)` draws causal models (nanocausal.scm.sample_scm), asks each of them up to
`questions_per_model` questions (`make_problem`) in the requested tasks and variants, shows
exactly the statements the question's formula reads (plus true but useless ones for
"redundant", minus two needed facts for "insufficient"), renders the text
(nanocausal.problem_text.render) and labels it with the solver's own decision rule
(problem_text.first_answer), so every label is what `solve` returns for its text. The same
arguments give the same problems, byte for byte. `generate` returns them as plain dicts;
`dataset_rows` turns them into TRL rows (sft, dpo, kto, rl) with the official user message
(nanocausal.caugym.official_prompt), worked solutions and wrong ones (nanocausal.solutions).

    python -m nanocausal.problems --format sft --n 20000 --out data/sft.jsonl
    python -m nanocausal.problems --solve problems.jsonl      # one solver answer a line
"""
import json
import random
import sys
from dataclasses import dataclass

from nanocausal.caugym import LACK, TASKS, VARIANTS, official_prompt
from nanocausal.problem_text import Statements, first_answer, render, solve
from nanocausal.scm import SCM, Query, candidates, formula, is_zero, leaves, sample_scm, size_range
from nanocausal.solutions import rejected_solution, solution

# ----------------------------------------------------------------------------- generator
BASE_STYLE = ("base", "omitted", "rephrased")   # variants written in the base text style by default


@dataclass
class Problem:
    """One generated item with everything needed to re-derive it (generate() gives its public view)."""
    scm: SCM                # the causal model the question is about
    q: Query
    z: tuple                # the backdoor set the label uses, () or (node,)
    m: tuple                # the mediator set the label uses (NDE, NIE), () or (node,)
    store: Statements       # the statements the text shows
    variant: str
    style: str              # text style, "base" or "generated"
    problem: str            # the text (problem_text.render)
    answer: str             # the label: an answer JSON or LACK_CONDITION
    missing: list           # insufficient: the leaves whose statements were removed, else None


def _coin(rng):
    """0 or 1, evenly."""
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
            if not w and zero and g.n > 2:  # (a 2-node graph has no third node to hold fixed)
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
        if store.shows(targets, cond):
            continue
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
        pool = [v for v in range(scm.graph.n) if v not in busy]   # never empty: X is not busy
        added = 0
        for _ in range(40):
            if added == 2:
                break
            v = rng.choice(pool)
            pa = scm.graph.parents[v]
            cond = tuple((u, _coin(rng)) for u in pa) if pa and rng.random() < 0.6 else ()
            target = ((v, _coin(rng)),)
            if store.shows(target, cond):
                continue
            store.add(target, cond, round(scm.prob(target, cond), 4), at=rng.randint(0, len(store.groups)))
            added += 1
    elif variant == "insufficient":  # two needed facts removed (a value and its complement are one)
        store = store.without(set(rng.sample(range(len(store.groups)), 2)))  # any formula reads 2+
        missing = list(dict.fromkeys(leaf for leaf in leaves(formula(q, z, m)) if not store.shows(leaf[1], leaf[2])))
    answer, _ = first_answer(q, scm.graph, store)
    if (answer == LACK) != (variant == "insufficient"):
        return None
    text = render(scm, q, store, style, instruction=variant != "omitted",
                  rng=rng if variant == "rephrased" else None)
    return Problem(scm, q, z, m, store, variant, style, text, answer, missing)


def _as_list(value, allowed, what):
    """A name, a comma list or a list of names -> the list, each checked against `allowed`."""
    items = [value] if isinstance(value, str) else list(value)
    items = [s.strip() for v in items for s in v.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad or items!r}; expected some of {', '.join(allowed)}")
    return items


def node_range(nodes, variant):
    """The (lo, hi) graph size of `variant`: nodes as int, (lo, hi) or "lo-hi" (scm.size_range), or
    the default by variant."""
    if nodes is None:
        return (3, 5) if variant in BASE_STYLE else (8, 8)
    return size_range(nodes)


def problems(n, tasks=TASKS, variant="base", nodes=None, seed=0, split="train", style=None,
             questions_per_model=20, zero_share=None):
    """n Problem objects, deterministic in all arguments. tasks / variant: a name, a comma list or
    a list; nodes: int, (lo, hi) or "lo-hi" (default 3-5 for base/omitted/rephrased, else 8);
    style: 'base' or 'generated' (default by variant); zero_share: share of ATE-NIE items whose
    answer is 0 (default 1/3 base style, else 0.1). Item i asks task i % len(tasks), variant
    cycling over the variants; every `questions_per_model` items share one causal model, drawn
    from the seed string f"{split}/{seed}/{k}", so different splits (or seeds) never share a model."""
    tasks, variants = _as_list(tasks, TASKS, "task"), _as_list(variant, VARIANTS, "variant")
    sizes = {v: node_range(nodes, v) for v in variants}
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of problems must be an integer >= 0, got {n!r}")
    if isinstance(questions_per_model, bool) or not isinstance(questions_per_model, int) or questions_per_model < 1:
        raise ValueError(f"questions_per_model must be a positive integer, got {questions_per_model!r}")
    if zero_share is not None and not (isinstance(zero_share, (int, float)) and 0 <= zero_share <= 1):
        raise ValueError(f"zero_share must be a share in [0, 1], got {zero_share!r}")
    out = []
    for i in range(n):
        task, var = tasks[i % len(tasks)], variants[(i // len(tasks)) % len(variants)]
        model_index = i // questions_per_model
        if i % questions_per_model == 0:
            rng, models = random.Random(f"{split}/{seed}/{model_index}"), {}
        item_style = style or ("base" if var in BASE_STYLE else "generated")
        share = zero_share if zero_share is not None else (1 / 3 if var in BASE_STYLE else 0.1)
        zero = task not in ("PN", "PS") and var not in ("insufficient", "deconfounding") and rng.random() < share
        for attempt in range(100):
            key = (sizes[var], attempt)
            if key not in models:   # a model per size; a spare model when one cannot host the item
                model_rng = random.Random(f"{split}/{seed}/{model_index}/{sizes[var]}/{attempt}")
                size = model_rng.randint(*sizes[var])
                kind = model_rng.choice(("story", "real", "nonsense") if size <= 12 else ("real", "nonsense"))
                models[key] = sample_scm(model_rng, size, min(0.6, 3.2 / size), kind)
            item = make_problem(rng, models[key], task, var, item_style, zero)
            if item is not None:
                out.append(item)
                break
        else:
            raise ValueError(f"cannot make a {task} {var} item on {sizes[var]} nodes")
    return out


def generate(*args, **kwargs):
    """problems(...) as plain dicts {problem, answer, solution, type, variant}."""
    return [{"problem": p.problem, "answer": p.answer, "solution": solution(p, missing=p.missing), "type": p.q.task,
             "variant": p.variant} for p in problems(*args, **kwargs)]

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
    """The command line (module docstring); argv=None reads sys.argv."""
    from nanocausal import cli, safe_files  # (script helpers: the generator itself needs neither)
    ap = cli.ArgumentParser(prog="python -m nanocausal.problems", description=(
        "Write CauGym-style causal problems as JSONL (sft: prompt/completion, dpo: prompt/chosen/rejected, "
        "kto: prompt/completion/label, rl: prompt/answer/type/variant), or solve problems from a file."))
    ap.add_argument("--format", choices=("sft", "dpo", "kto", "rl"), default="sft", help="dataset layout")
    ap.add_argument("--n", type=cli.non_negative_int, default=1000, help="number of items")
    ap.add_argument("--out", default="-", help="output JSONL path ('-' = stdout)")
    ap.add_argument("--tasks", type=cli.task_list, default=",".join(TASKS), help="comma list of tasks, e.g. ATE,PN")
    ap.add_argument("--variant", type=cli.variant_list, default="base", help=f"comma list of variants: {', '.join(VARIANTS)}")
    ap.add_argument("--nodes", type=cli.graph_sizes, default=None, help="graph size: N or LO-HI (default 3-5 base style, else 8)")
    ap.add_argument("--style", choices=("base", "generated"), default=None, help="text format (default by variant)")
    ap.add_argument("--seed", type=cli.seed, default=0, help="random seed")
    ap.add_argument("--split", default="train", help="split name; different splits never share a causal model")
    ap.add_argument("--questions-per-model", type=cli.positive_int, default=20, help="questions asked of each causal model")
    ap.add_argument("--zero-share", type=cli.probability, default=None, help="share of ATE-NIE items with answer 0")
    ap.add_argument("--lack-hint-all", action="store_true", help="add the LACK_CONDITION hint to every prompt")
    ap.add_argument("--solve", metavar="PATH", help="solve the problems in a .json/.jsonl file (key problem or "
                    "prompt) and print one answer per line")
    args = ap.parse_args(argv)
    if args.solve:
        try:
            rows = safe_files.read_records(args.solve, json_list=None)  # a JSON list, or JSON Lines
        except OSError as e:
            ap.error(f"cannot read {args.solve}: {e.strerror}")
        except ValueError as e:
            ap.error(str(e))
        for row, where in rows:
            text = row.get("problem", row.get("prompt")) if isinstance(row, dict) else row
            if not isinstance(text, str):
                ap.error(f"{where}: expected a problem text (a string, or an object with key problem or prompt)")
            try:
                print(solve(text))
            except ValueError as e:
                ap.error(f"{where}: {e}")
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
