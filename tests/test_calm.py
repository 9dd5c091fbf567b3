"""nanocausal.calm (CaLM-Lite in eval.py): prompts and labels equal what CaLM's own code gives, the
`gold` pseudo-model scores 100 % on every scored task and the oracle on the probability tasks,
and the errors a user meets name the file and the field.

The expected prompts and labels in tests/fixtures/calm/ were produced by running CaLM's own
get_prompt and get_pred_label (OpenCausaLab/CaLM at commit 1c1e93a) on the CaLM-Lite files
(tests/fixtures/calm/make_fixtures.py): the prompts of the first 3 items of every file in both
styles, and the labels of hand-written replies in the forms models produce, for every task."""
import json
from pathlib import Path

import pytest

from conftest import run_script
from nanocausal import calm, evaluation
from nanocausal.evaluation import EvalConfig

FIXTURES = Path(__file__).parent / "fixtures" / "calm"


@pytest.fixture(scope="module")
def calm_dir(shared_dir):
    folder = shared_dir / "data" / "calm_lite"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    return folder


def task_files(folder):
    return sorted(folder.rglob("*.json"))


def first_items(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_every_calm_lite_file_is_a_known_task(calm_dir):
    tasks = [path.stem for path in task_files(calm_dir)]
    assert len(tasks) == 39 and set(tasks) <= set(calm.TASKS)
    assert set(tasks) == set(json.loads((FIXTURES / "prompts.json").read_text()))
    for path in task_files(calm_dir):  # the folder is CaLM's rung
        assert path.relative_to(calm_dir).parts[0] == calm.TASKS[path.stem][0]


@pytest.mark.parametrize("style", calm.STYLES)
def test_prompts_equal_calms(calm_dir, style):
    expected = json.loads((FIXTURES / "prompts.json").read_text())
    for path in task_files(calm_dir):
        for item, prompts in zip(first_items(path, 3), expected[path.stem]):
            assert calm.prompt(item, path.stem, style) == prompts[style], (path.stem, item["index"])


def test_labels_equal_calms(calm_dir):
    rows = [json.loads(line) for line in (FIXTURES / "labels.jsonl").read_text().splitlines()]
    items = {path.stem: first_items(path, 1)[0] for path in task_files(calm_dir)}
    ours = [calm.label_and_score(r["reply"], items[r["task"]], r["task"], r["style"])[0] for r in rows]
    wrong = [(r["task"], r["style"], r["reply"], label, r["label"])
             for r, label in zip(rows, ours) if label != r["label"]]
    assert not wrong, wrong[:5]
    families = {calm.TASKS[r["task"]][2] for r in rows}
    assert families == set(calm.FAMILIES) - {"open"}  # every labelling family is checked


@pytest.mark.parametrize("task, reply, label", [
    ("CORR-B_correlation_EN", "Yes", 1), ("CORR-B_correlation_EN", "no.", 0), ("CORR-B_correlation_EN", "", -1),
    ("CORR-B_correlation_EN", "I cannot tell.", -1),
    # the first phrase of CaLM's yes table found sets a position; a "no" phrase before it wins
    ("CORR-B_correlation_EN", "The answer is no. Hmm, the answer is yes.", 0),
    ("AC-B_causal_judgement_EN", "- Yes\n- No", -1),  # both listed: no label
    ("CA-B_FP_EN", "Yes, it is the parent of F.", 1),
    ("BAS-C_max-BAS_EN", "Answer: option 2", 2), ("BAS-C_max-BAS_EN", "Option 1 or Option 2", -1),
    ("CR-C_CRASS_EN", "Option 4", 4), ("PCD-C_COPA_EN", "Option 1", 0), ("PCD-C_COPA_EN", "Option 2", 1),
    ("ATE-B_ATE-natural_EN", '{"ANSWER": "No", "PROB": "0.1"}', "no"), ("ATE-B_ATE-natural_EN", "No.", None),
    ("PN-P_PN-basic_EN", 'So {"PROB": "0.2500"}', 0.25), ("PN-P_PN-basic_EN", '{"PROB": 0}', None),
])
def test_labels_of_typical_replies(calm_dir, task, reply, label):
    path = next(p for p in task_files(calm_dir) if p.stem == task)
    assert calm.label_and_score(reply, first_items(path, 1)[0], task)[0] == label


def test_probabilities_are_compared_at_four_decimals():
    item = {"gt_answer": -0.08429999999999993}
    correct = lambda reply: calm.label_and_score(reply, item, "ATE-P_ATE-basic_EN")[1]
    assert correct('{"PROB": "-0.0843"}')
    assert correct('{"PROB": "-0.08434"}')  # rounds to -0.0843
    assert not correct('{"PROB": "-0.0844"}')
    assert not correct("-0.0843")  # no JSON, no label
    assert calm.label_and_score("anything", {"gt_answer": "why"}, "CEG-O_E-CARE_EN") == (None, None)  # not scored


def test_gold_scores_100_percent_on_every_scored_task(calm_dir):
    name, items = calm.load_dataset(str(calm_dir))
    records = evaluation.evaluate("gold", None, items, dataset=name, num_samples=1, progress=False)
    table = evaluation.accuracy(records)
    scored = {item["type"] for item in items if calm.scored(item["type"])}
    assert len(scored) == 38 and set(table) == scored | {"overall"}
    assert all(value == 1.0 for value in table.values()), {k: v for k, v in table.items() if v < 1}
    assert set(evaluation.accuracy(records, by="rung")) == set(calm.RUNGS) | {"overall"}


def test_oracle_scores_100_percent_on_the_probability_tasks(calm_dir):
    name, items = calm.load_dataset(str(calm_dir))
    records = evaluation.evaluate("oracle", None, items, dataset=name, num_samples=1, progress=False)
    table = evaluation.accuracy(records)
    probability = {t for t in calm.TASKS if calm.TASKS[t][2] == "probability" and "basic" in t}
    assert set(table) == probability | {"overall"} and table["overall"] == 1.0
    assert all(r["response"] is None and r["correct"] is None for r in records if r["type"] not in probability)


def test_the_command_line_prints_the_calm_table_and_resumes(calm_dir, tmp_path):
    folder = calm_dir / "association"
    explanation = calm_dir / "counterfactual" / "causal_explanation_generation"
    args = ("eval.py", "--model", "gold", "--data", folder, explanation, "--per-task", 2, "--num-samples", 1,
            "--out", tmp_path / "run")
    out = run_script(*args).stdout
    assert "| CORR-B_correlation_EN | 50.0 | 100.0 | - |" in out
    assert "| CEG-O_E-CARE_EN | - | - | not scored |" in out and "| **association** |  | 100.0 | - |" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"]["association"]["overall"] == 1.0 and summary["accuracy"]["association"]["_samples"] == 4
    assert summary["random_guess"]["EAE-B_exp-away_EN"] == 50.0 and summary["protocol"]["prompt_style"] == "basic"
    records = evaluation.read_responses(tmp_path / "run" / "responses.jsonl")
    assert len(records) == 6 and {r["label"] for r in records if r["rung"] == "association"} <= {0, 1}
    assert "resuming: 6 problems already answered" in run_script(*args).stdout
    with pytest.raises(ValueError, match="CauGym responses only"):
        evaluation.rescore(str(tmp_path / "run" / "responses.jsonl"))


def test_zero_shot_cot_prompts_reach_the_model(calm_dir, tmp_path):
    config = EvalConfig(model="gold", data=[str(calm_dir / "intervention" / "average_treatment_effect")],
                        per_task=2, num_samples=1, prompt_style="zero-shot-CoT", out=str(tmp_path))
    summary = evaluation.run(config)
    assert summary["accuracy"]["average_treatment_effect"]["overall"] == 1.0
    assert json.loads((tmp_path / "run.json").read_text())["prompt_style"] == "zero-shot-CoT"
    name, items = evaluation.load_dataset(config.data[0], prompt_style="zero-shot-CoT")
    assert all("Let's think step by step." in item["prompt"][0]["content"] for item in items)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_errors_name_the_file_and_the_field(tmp_path):
    item = {"index": 1, "given_info": "A causes B.", "question": "Does A cause B?", "gt_answer": "yes"}
    good = write(tmp_path / "CORR-B_correlation_EN.json", [json.dumps(item)])
    assert calm.load_task(good)[0] == "CORR-B_correlation_EN"
    (tmp_path / "a").mkdir()
    missing = write(tmp_path / "a" / "CORR-B_correlation_EN.json", [json.dumps(item), json.dumps({"gt_answer": "no"})])
    with pytest.raises(ValueError, match=r"CORR-B_correlation_EN.json:2: field 'given_info' missing: not an item of "
                                         r"CaLM task CORR-B_correlation_EN \(its items have given_info, question"):
        calm.load_task(missing)
    with pytest.raises(ValueError, match=r"XYZ-B_unknown_EN.json: no CaLM prompt for task 'XYZ-B_unknown_EN'"):
        evaluation.load_dataset(str(write(tmp_path / "XYZ-B_unknown_EN.json", [json.dumps(item)])))
    # CaLM items under any other name
    with pytest.raises(ValueError, match=r"my_subset.json: no CaLM prompt for task 'my_subset'"):
        evaluation.load_dataset(str(write(tmp_path / "my_subset.json", [json.dumps(item)])))
    with pytest.raises(ValueError, match=r"CORR-B_correlation_CN.json: no CaLM prompt .*only CaLM's English tasks"):
        evaluation.load_dataset(str(write(tmp_path / "CORR-B_correlation_CN.json", [json.dumps(item)])))
    with pytest.raises(ValueError, match=r"EAE-B_exp-away_EN.json: empty file"):
        evaluation.load_dataset(str(write(tmp_path / "EAE-B_exp-away_EN.json", [])))
    with pytest.raises(ValueError, match=r"CB-B_collider-bias_EN.json:1: not a JSON object"):
        evaluation.load_dataset(str(write(tmp_path / "CB-B_collider-bias_EN.json", ["[1, 2]"])))
    with pytest.raises(ValueError, match=r"CB-B_collider-bias_EN.json:2: not valid JSON"):
        calm.load_task(write(tmp_path / "CB-B_collider-bias_EN.json", [json.dumps(item), '{"gt_answer": ']))
    with pytest.raises(ValueError, match=r"ATE-B_ATE-natural_EN.json:1: field 'Background.data_info' missing"):
        calm.load_task(write(tmp_path / "ATE-B_ATE-natural_EN.json", [json.dumps(
            {"given_info": "", "Background": {}, "Instruction": "", "Question": "", "gt_answer": "No"})]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no CaLM task files"):
        evaluation.load_dataset(str(tmp_path / "empty"))
    (tmp_path / "latin1.json").write_bytes(b'{"gt_answer": "caf\xe9"}\n')  # once a bare UnicodeDecodeError
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(byte 0xe9"):
        evaluation.load_dataset(str(tmp_path / "latin1.json"))
