"""nanocausal.problems: generator self-consistency (every label is what the solver answers),
determinism, variants without surface cues, statistics against the official data, the official
prompt of the dataset rows, and the CLI."""
import json
import re
import statistics

import pytest

from nanocausal import caugym
from nanocausal.caugym import LACK
from nanocausal.problem_text import CONDS, MARGS, PREAMBLES, Statements, solve
from nanocausal.problems import _show_facts, generate, main, problems
from nanocausal.scm import is_zero

# ----------------------------------------------------------------------------- generator
def test_every_generated_item_solves_to_its_label():
    count = 0
    for variant in caugym.VARIANTS:
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


def test_generate_is_the_same_in_every_process_whatever_the_string_hash_seed():
    """A resumed run and an eval set regenerate their problems in a new process, whose string hashing
    (PYTHONHASHSEED) differs: the problems, nonsense names included, must not depend on it."""
    import os
    import subprocess
    import sys
    code = "import json; from nanocausal.problems import generate; print(json.dumps(generate(60, seed=3), default=str))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outputs) == 1


def test_variants_have_no_surface_cue():
    for style_variant in ("deconfounding", "redundant", "insufficient", "omitted", "rephrased"):
        for p in problems(70, variant=style_variant, seed=9, split="cue"):
            stmt_line = p.problem.split("\n")[1]
            assert stmt_line == "" or stmt_line.endswith(". "), stmt_line[-20:]
            assert ("Instruction:" in p.problem) == (p.variant != "omitted")
            coded = re.search(r"\([A-Z]=[01]\)", p.problem) is not None
            assert coded == (p.style == "generated") or not stmt_line
            zero = is_zero(p.q, p.scm.graph)
            needed = Statements() if zero else _show_facts(p.scm, p.q, p.z, p.m, p.style)
            if p.variant == "redundant":
                assert len(p.store.facts()) == len(needed.facts()) + 2
            if p.variant == "insufficient":
                assert p.answer == LACK and len(p.store.groups) == len(needed.groups) - 2
            if p.variant == "deconfounding" and p.q.task not in ("PN", "PS"):
                assert p.z and not is_zero(p.q, p.scm.graph)
    rephrased = generate(30, variant="rephrased", seed=2)
    assert sum(PREAMBLES[0] not in it["problem"] for it in rephrased) > 5
    assert sum(any(t.split("{")[0] in it["problem"] for t in CONDS[1:] + MARGS[1:]) for it in rephrased) > 5


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


def test_official_prompt():
    assert caugym.official_prompt("Q", "base") == "Q\nLet's think step by step."
    assert caugym.official_prompt("Q", "insufficient") == ("Q\nLet's think step by step. If the condition is not "
                                                           "enough to solve the question, output \"LACK_CONDITION\" "
                                                           "as final answer.")


def test_cli(tmp_path, capsys):
    out = tmp_path / "rl.jsonl"
    main(["--format", "rl", "--n", "7", "--out", str(out), "--variant", "base,insufficient"])
    rows = [json.loads(ln) for ln in open(out)]
    assert [set(r) for r in rows] == [{"prompt", "answer", "type", "variant"}] * 7
    for fmt, keys in (("sft", {"prompt", "completion"}), ("dpo", {"prompt", "chosen", "rejected"}),
                      ("kto", {"prompt", "completion", "label"})):
        main(["--format", fmt, "--n", "4", "--out", str(out)])
        assert all(set(json.loads(ln)) == keys for ln in open(out))
    for bad in (["--tasks", "ATE,XYZ"], ["--variant", "nope"], ["--out", str(tmp_path / "no" / "x.jsonl")],
                ["--solve", str(tmp_path / "missing.json")], ["--nodes", "1"]):
        with pytest.raises(SystemExit):
            main(bad + ["--n", "2"])
        assert "error:" in capsys.readouterr().err
    problems_file = tmp_path / "p.jsonl"
    problems_file.write_text(json.dumps({"problem": "not a problem"}) + "\n")
    with pytest.raises(SystemExit):
        main(["--solve", str(problems_file)])
    assert f"{problems_file}:1: " in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, named", [(dict(n=-1), "number of problems"), (dict(n=3, questions_per_model=0), "questions_per_model"),
                                           (dict(n=3, zero_share=2.0), "zero_share"), (dict(n=3, nodes="x"), "nodes"),
                                           (dict(n=3, nodes="1-40"), "nodes must lie in 2..16")])
def test_generator_arguments_are_checked_before_any_work(kwargs, named):
    with pytest.raises(ValueError, match=named):
        problems(**kwargs)


@pytest.mark.parametrize("zero_share", [0.0, 1.0])
def test_a_cde_on_two_nodes_is_refused_by_name(zero_share):
    """A zero CDE may hold a third node fixed; a 2-node graph has none (it was refused with random's
    'Sample larger than population')."""
    with pytest.raises(ValueError, match=r"cannot make a CDE base item on \(2, 2\) nodes"):
        problems(20, tasks="CDE", nodes=2, zero_share=zero_share)
