"""The five-method comparison (pipeline.py, nanocausal/comparison.py): the preference data built
from scored replies, the constant-answer baseline, the table and results.json, the flags, and the
whole pipeline end to end on the shipped tiny base."""
import json
import os

from conftest import run_script
from nanocausal import caugym, comparison, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preference_pairs_use_each_reply_once_and_only_mixed_prompts():
    prompts = tiny.make_problems(3, seed=0)
    replies = {0: [True, False, True, False, True], 1: [True, True], 2: [False, False]}
    records = [{"index": i, "response": f"p{i} r{j} {'right' if ok else 'wrong'}", "correct": ok}
               for i, oks in replies.items() for j, ok in enumerate(oks)]
    pairs = comparison.preference_pairs(records, prompts)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("p0 r0 right", "p0 r1 wrong"), ("p0 r2 right", "p0 r3 wrong")]
    assert all(p["prompt"] == caugym.official_prompt(prompts[0]["problem"]) for p in pairs)


def test_constant_answer_is_scored_by_the_official_rule():
    tests = {"base": tiny.make_problems(40, seed=1), "insufficient": tiny.make_problems(10, seed=2, variant="insufficient")}
    scores = comparison.constant_scores(tests)
    share = sum(it["kind"] == "no path" for it in tests["base"]) / 40
    assert scores["base"] == {"effect": 0.0, "no path": 1.0, "overall": share, "ATE": share}
    assert scores["insufficient"]["overall"] == 0.0 and "no path" not in scores["insufficient"]


def test_the_table_has_a_row_per_model_and_decoding_and_a_column_per_set_and_group():
    tests = {"base": tiny.make_problems(30, seed=3, queries=tiny.QUERIES),
             "insufficient": tiny.make_problems(5, seed=4, variant="insufficient")}
    constant = comparison.constant_scores(tests)
    scores = {"SFT": {name: {"greedy": dict(c, overall=0.25), "sampled": dict(c, overall=0.125)}
                      for name, c in constant.items()}, "SFT + DPO": {name: {"greedy": c, "sampled": c} for name, c in constant.items()}}
    table = comparison.results_table(scores, constant, tests).splitlines()
    head = next(line for line in table if line.startswith("| model"))
    assert head == ("| model | decoding | base: effect | base: no path | base: ATE | base: ETT | base: overall | "
                    "insufficient: effect | insufficient: overall |")
    rows = [line for line in table if line.startswith("| ") and line != head]
    assert [r.split(" | ")[:2] for r in rows] == [["| constant answer", "-"], ["| SFT", "greedy"], ["| SFT", "sampled"],
                                                  ["| SFT + DPO", "greedy"], ["| SFT + DPO", "sampled"]]
    assert rows[1].endswith("| 25.0 | 0.0 | 25.0 |") and rows[2].endswith("| 0.0 | 12.5 |")


def test_methods_flag():
    methods = comparison.name_list(comparison.METHODS, comparison.GRPO_VARIANTS)
    variants = comparison.name_list(tiny.VARIANTS[1:5], ("heldout",))
    assert methods("all") == comparison.METHODS
    assert comparison.stages(methods("grpo,dpo"), (), False)[0] == ("sft", "dpo", "grpo")  # SFT is the start
    assert comparison.stages(methods("sft,grpo"), (), False)[0] == ("sft", "grpo")
    for flag, value, named in (("--methods", "sft,rlhf", "unknown 'rlhf'"), ("--variants", "deconfounding",
                                                                             "unknown 'deconfounding'")):
        out = run_script("pipeline.py", flag, value, check=False)  # refused by argparse, before any work
        assert out.returncode == 2 and named in out.stderr and out.stderr.count("\n") == 1
    steps = comparison.budgets(10, ppo=None, dpo=7, kto=None, control=None)
    assert steps == {"grpo": 10, "grpo_step": 10, "grpo_adaptive": 10, "dpo": 7,
                     **{m: round(comparison.STEPS_PER_GRPO_STEP[m] * 10) for m in ("ppo", "kto", "control")}}
    # issue 30's GRPO variants and the held-out wording are named, never part of "all"
    assert comparison.stages(methods("grpo_adaptive,grpo,grpo_step"), (), False)[0] == \
        ("sft", "grpo", "grpo_step", "grpo_adaptive")
    assert variants("all") == tiny.VARIANTS[1:5]
    assert comparison.stages(("sft",), variants("omitted,redundant"), True)[1] == ("heldout", "omitted", "redundant")


def table_numbers(markdown):
    """{(model, decoding): [cells]} of the results table in results.md."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows[1:]}


SMOKE = ["--sft-steps", "100", "--grpo-steps", "2", "--prompts-per-step", "4", "--group-size", "4",
         "--test-problems", "20", "--variant-problems", "10", "--pref-prompts", "48", "--pref-samples", "4",
         "--pref-batch-size", "2", "--eval-samples", "1"]


def test_the_pipeline_runs_all_methods_on_two_jobs_as_on_one_and_writes_what_it_prints(tmp_path):
    """--methods all, a few steps each from the shipped tiny base: every method's row with every
    column, results.json holding the printed numbers, results.png; then the default methods on one
    job: the rows they share are the same numbers (the jobs are independent)."""
    printed = run_script("pipeline.py", "--methods", "all", "--out", tmp_path / "all", "--jobs", "2", *SMOKE).stdout
    markdown = (tmp_path / "all" / "results.md").read_text()
    assert markdown in printed
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["args"]["methods"] == list(comparison.METHODS)
    assert results["preference_data"]["pairs"] >= 2
    cells = table_numbers(markdown)
    columns = [(name, group) for name in ("base", "omitted", "redundant") for group in ("effect", "no path", "overall")]
    trained = comparison.METHODS + ("control",)
    assert set(cells) == {("constant answer", "-")} | {(comparison.NAMES[m], mode) for m in trained
                                                      for mode in ("greedy", "sampled")}
    for (model, mode), row in cells.items():
        assert len(row) == len(columns)
        source = results["constant_answer"] if model == "constant answer" else {
            name: by_mode[mode] for name, by_mode in results["scores"][model].items()}
        assert row == [f"{100 * source[name][group]:.1f}" for name, group in columns]
    assert set(results["reward_curves"]) == {"SFT + PPO", "SFT + GRPO"}
    assert (tmp_path / "all" / "results.png").stat().st_size > 10_000
    assert all((tmp_path / "all" / m / "checkpoint" / "model.safetensors").is_file() for m in trained)

    run_script("pipeline.py", "--out", tmp_path / "default", "--jobs", "1", *SMOKE)
    defaults = json.loads((tmp_path / "default" / "results.json").read_text())["args"]
    assert defaults["methods"] == ["sft", "grpo"] and defaults["variants"] == ["omitted", "redundant"]
    assert (defaults["reward"], defaults["curriculum"], defaults["varied"], defaults["curve_every"]) == \
        ("outcome", "fixed", False, 0)
    again = table_numbers((tmp_path / "default" / "results.md").read_text())
    assert set(again) == {k for k in cells if k[0] in ("constant answer", "SFT", "SFT + GRPO", "SFT + more SFT (control)")}
    assert all(again[k] == cells[k] for k in again)


def test_varied_data_never_trains_on_the_held_out_wording_and_the_curve_file_tags_every_set(tmp_path):
    from nanocausal.problem_text import PREAMBLES
    tests, _ = comparison.make_data(str(tmp_path), 0, sft_examples=60, rl_prompts=60, rl_kinds=("effect",),
                                       test_problems=30, variant_problems=20, variants=("heldout", "redundant"),
                                       queries=("ATE",), slip_rate=0.0, train_variant="varied", curve_problems=10)
    assert list(tests) == ["varied", "heldout", "redundant"]
    rows = {name: [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")] for name in ("sft", "rl", "curve")}
    training = [r["prompt"] for r in rows["sft"] + rows["rl"]]
    assert not any(PREAMBLES[2] in prompt for prompt in training)  # the held-out wording is never trained on
    assert any(PREAMBLES[1] in prompt for prompt in training) and any(PREAMBLES[0] in prompt for prompt in training)
    assert all(PREAMBLES[2] in it["problem"] for it in tests["heldout"])
    assert [r["variant"] for r in rows["curve"]] == ["varied"] * 10 + ["heldout"] * 10 + ["redundant"] * 10
    assert [r["answer"] for r in rows["curve"]] == [it["answer"] for items in tests.values() for it in items[:10]]
