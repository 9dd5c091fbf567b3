"""nanocausal.evaluation (what eval.py runs): the oracle scores 100 % under the official protocol,
scoring follows the official rule item by item, and an interrupted run resumes without answering
anything twice."""
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import run_script
from nanocausal import caugym as protocol, evaluation, pass_at_k, tiny
from nanocausal.checkpoint import load_model
from nanocausal.evaluation import EvalConfig
from nanocausal.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAUGYM = SHARED / "data" / "caugym"


def caugym(name):
    if not (CAUGYM / name).is_file():
        pytest.skip(f"{CAUGYM / name} (the team's read-only shared folder) is not present")
    return str(CAUGYM / name)


def official_rule(response, answer):
    """sample_evaluate.py's rule, written out independently of nanocausal.caugym."""
    if answer.strip() == "LACK_CONDITION":
        return "LACK_CONDITION" in response
    gold = float(json.loads(answer)["PROB"])
    for span in re.findall(r'\{"(?:ANSWER|PROB)":[^}]*\}', "".join(response.split())):
        try:
            prob = float(json.loads(span.lower())["prob"])
        except (ValueError, KeyError, TypeError):
            continue
        if abs(prob - gold) <= 0.0005 + 1e-12:
            return True
    return False


@pytest.mark.parametrize("name,tasks", [("base.json", protocol.TASKS),
                                        ("deconfounding.json", ("ATE", "CDE", "ETT", "NDE", "NIE")),
                                        ("insufficient.json", protocol.TASKS)])
def test_oracle_scores_100_percent(name, tasks):
    dataset, items = evaluation.load_dataset(caugym(name))
    items = [it for it in evaluation.per_task_slice(items, 8) if it["type"] in tasks]
    records = evaluation.evaluate("oracle", None, items, dataset=dataset, num_samples=1, progress=False)
    table = evaluation.accuracy(records)
    assert set(table) == set(tasks) | {"overall"}
    assert table["overall"] == 1.0, [r for r in records if not r["correct"]][:2]
    if name == "insufficient.json":  # the official prompt carries the LACK_CONDITION hint
        assert all("LACK_CONDITION" in it["prompt"][-1]["content"] for it in items)


def test_scoring_matches_official_rule_on_saved_responses(tmp_path):
    _, items = evaluation.load_dataset(caugym("base.json"))
    items = evaluation.per_task_slice(items, 3)
    lines = []
    for i, item in enumerate(items):
        answer = item["answer"]
        gold = json.loads(answer)
        prob = float(gold["PROB"])
        keys = '"ANSWER": "Yes", ' if "ANSWER" in gold else ""
        responses = [
            f"So {{{keys}\"PROB\": \"{prob:.4f}\"}}",  # right
            f"{{{keys}\"PROB\": \"{prob + 0.0004:.4f}\"}}",  # within tolerance
            f"{{{keys}\"PROB\": \"{prob + 0.0007:.4f}\"}}",  # outside
            f"first {{\"PROB\": \"0.9999\"}} then {{ \"PROB\" : \" {prob} \" }}",  # any span counts, spaces ignored
            f"{{\"prob\": \"{prob:.4f}\"}}",  # lower-case keys are not an answer span
            f"{{\"PROB\": {prob:.4f}",  # never closed
            f"{{\"ANSWER\": \"No\", \"PROB\": \"abc\"}} {{\"PROB\": \"{prob:.4f}\"}}",
            "LACK_CONDITION",
        ]
        lines += [{"dataset": "base", "key": f"base/{i}", "index": i, "sample": s, "type": item["type"],
                   "answer": answer, "response": r} for s, r in enumerate(responses)]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, columns = evaluation.rescore(str(path))
    assert [r["correct"] for r in records] == [official_rule(r["response"], r["answer"]) for r in lines]
    assert 0 < columns["base"]["overall"] < 1  # both outcomes occur


def test_resume_skips_answered_items(tmp_path, monkeypatch):
    data = caugym("base.json")
    out = tmp_path / "run"
    config = EvalConfig(model="oracle", data=[data], per_task=2, num_samples=2, out=str(out))
    first = evaluation.run(config)
    assert first["accuracy"]["base"]["overall"] == 1.0
    responses = (out / "responses.jsonl").read_text().splitlines()
    assert len(responses) == 14 * 2
    # Interrupted: 5 problems finished, the 6th half-answered (one sample), a torn last line.
    (out / "responses.jsonl").write_text("\n".join(responses[:11]) + "\n" + responses[11][:20])
    answered = []
    real = evaluation.solve
    monkeypatch.setattr(evaluation, "solve", lambda problem: answered.append(problem) or real(problem))
    second = evaluation.run(config)
    assert len(answered) == 14 - 5  # the half-answered problem is redone whole
    assert second["accuracy"]["base"]["_samples"] == 28 and second["accuracy"]["base"]["overall"] == 1.0
    final = evaluation.read_responses(out / "responses.jsonl")
    assert len(final) == 28 and len({(r["key"], r["sample"]) for r in final}) == 28
    # Nothing was rewritten: the first run's lines are still there, the torn line on its own line.
    lines = (out / "responses.jsonl").read_text().splitlines()
    assert lines[:11] == responses[:11] and lines[11] == responses[11][:20]


def test_a_damaged_line_is_skipped_and_the_lines_after_it_kept(tmp_path, capsys):
    config = EvalConfig(model="oracle", data=[caugym("base.json")], per_task=2, num_samples=1, out=str(tmp_path))
    evaluation.run(config)
    path = tmp_path / "responses.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = "{garbage"
    path.write_text("\n".join(lines) + "\n")
    records = evaluation.read_responses(path)
    assert len(records) == 13 and f"{path}:4: not a response record, skipped" in capsys.readouterr().out
    summary = evaluation.run(config)  # only the damaged problem is answered again
    assert summary["accuracy"]["base"]["_samples"] == 14
    assert len(path.read_text().splitlines()) == 15


def test_rescore_names_the_bad_record_by_problem_and_sample_not_by_a_shifted_line(tmp_path, capsys):
    rows = [{"key": "a", "sample": 0, "response": "x", "answer": "y"}] * 2  # a resumed run answered "a" twice
    rows.append({"key": "b", "sample": 1, "response": None, "answer": "y"})
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as refused:
        evaluation.rescore(path)
    assert str(refused.value) == f"{path}: the response to problem 'b', sample 1: field 'response' must be a string"


@pytest.mark.parametrize("change, named", [(dict(temperature=0.0), "temperature 0.6 -> 0.0"),
                                           (dict(max_new_tokens=64), "max_new_tokens 8192 -> 64"),
                                           (dict(model="gold"), "model 'oracle' -> 'gold'")])
def test_resuming_into_another_runs_responses_is_refused(tmp_path, change, named):
    config = EvalConfig(model="oracle", data=[caugym("base.json")], per_task=1, num_samples=1, out=str(tmp_path))
    evaluation.run(config)
    with pytest.raises(ValueError, match=re.escape(named)):
        evaluation.run(EvalConfig(**{**config.__dict__, **change}))


def test_reply_length_is_capped_by_the_context():
    # The official protocol asks for 8192 new tokens; a model whose context is shorter (SmolLM2:
    # 8192 in all, the tiny preset: 512) answers within what its context leaves.
    folder = Path(__file__).resolve().parents[1] / "data" / "tiny-base"
    model, tokenizer = load_model(folder), Tokenizer.from_pretrained(folder)
    items = [{"prompt": [{"role": "user", "content": protocol.official_prompt(it["problem"])}], "answer": it["answer"]}
             for it in tiny.make_problems(2, seed=0)]
    longest = max(len(tokenizer.apply_chat_template(it["prompt"], add_generation_prompt=True)) for it in items)
    records = evaluation.evaluate(model, tokenizer, items, num_samples=1, temperature=1.0, top_p=1.0, progress=False)
    for record in records:
        assert len(tokenizer.encode(record["response"])) <= model.config.max_position_embeddings - longest


def test_the_command_line_prints_the_table_and_writes_the_summary(tmp_path):
    out = run_script("eval.py", "--model", "oracle", "--data", caugym("base.json"), "--per-task", 1,
                     "--num-samples", 1, "--out", tmp_path / "run")
    assert "| overall | 100.0 |" in out.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["accuracy"]["base"]["overall"] == 1.0


def tiny_items(n, seed=0):
    return [{"prompt": [{"role": "user", "content": protocol.official_prompt(it["problem"])}], "answer": it["answer"],
             "type": it["type"]} for it in tiny.make_problems(n, seed=seed)]


def test_greedy_responses_are_the_replies_alone_and_samples_do_not_depend_on_the_batch_size():
    """Continuous batching (generate.generate_many) changes no greedy reply (each equals the
    reply to the problem alone), and a sampled reply depends on the seed and the problem
    only: the same for any --batch-size, and each problem's records arrive as soon as it is done."""
    from nanocausal.generate import generate_many
    folder = Path(__file__).resolve().parents[1] / "data" / "tiny-base"
    model, tokenizer = load_model(folder), Tokenizer.from_pretrained(folder)
    items = tiny_items(7)
    greedy = evaluation.evaluate(model, tokenizer, items, temperature=0, max_new_tokens=40, batch_size=3,
                                 progress=False)
    for record, item in zip(greedy, items):
        prompt = tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True)
        alone = generate_many(model, [prompt], 40, slots=1, temperature=0, eos_token_ids=tokenizer.eos_token_ids,
                         vocab_size=tokenizer.vocab_size).completions()[0]
        assert record["response"] == tokenizer.decode(alone, skip_special_tokens=True)

    runs = {}
    for batch_size in (1, 3, 8):
        arrived = []
        records = evaluation.evaluate(model, tokenizer, items, num_samples=2, temperature=1.0, top_p=1.0,
                                      max_new_tokens=40, batch_size=batch_size, seed=5, progress=False,
                                      on_records=arrived.append)
        assert [len(batch) for batch in arrived] == [2] * 7  # one call per problem, with its two samples
        assert [(r["index"], r["sample"]) for r in records] == [(i, s) for i in range(7) for s in (0, 1)]
        runs[batch_size] = [r["response"] for r in records]
    assert runs[1] == runs[3] == runs[8]
    assert len(set(runs[1])) > 7  # sampled replies differ between samples and problems
    other_seed = evaluation.evaluate(model, tokenizer, items, num_samples=2, temperature=1.0, top_p=1.0,
                                     max_new_tokens=40, batch_size=8, seed=6, progress=False)
    assert [r["response"] for r in other_seed] != runs[8]


def test_the_model_is_compared_by_content_not_by_path(tmp_path):
    """Another model's answers are not reused: a folder whose weights were replaced is refused,
    the same model moved to another path resumes (nothing answered again)."""
    from conftest import make_tiny_chat_model
    from nanocausal.checkpoint import save_model
    folder = make_tiny_chat_model(tmp_path / "model", max_positions=2048)  # room for the tiny prompts
    config = EvalConfig(model=str(folder), data=["tiny:3"], max_new_tokens=2, batch_size=3, device="cpu",
                        out=str(tmp_path / "out"))
    first = evaluation.run(config)
    lines = (tmp_path / "out" / "responses.jsonl").read_text()
    moved = folder.rename(tmp_path / "moved")
    assert evaluation.run(EvalConfig(**{**config.__dict__, "model": str(moved)}))["accuracy"] == first["accuracy"]
    assert (tmp_path / "out" / "responses.jsonl").read_text() == lines  # every answer reused, none added
    model = load_model(moved)
    model.norm.weight.data.mul_(2)
    save_model(model, moved)  # same path, other weights
    with pytest.raises(ValueError, match=f"model {moved}: its files changed since those responses"):
        evaluation.run(EvalConfig(**{**config.__dict__, "model": str(moved)}))
    assert (tmp_path / "out" / "responses.jsonl").read_text() == lines


def test_pass_at_k_is_the_unbiased_estimator():
    """pass@k = the share of the C(n, k) subsets of k samples that hold a correct one, counted here."""
    from itertools import combinations
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_pass_and_majority_by_hand():
    gold, lack = '{"ANSWER": "Yes", "PROB": "0.5000"}', protocol.LACK
    right, wrong, other = '{"PROB": "0.5001"}', '{"PROB": "0.7"}', '{"PROB": "0.9"}'
    problems = {("a", "ATE", gold): [right, wrong, wrong, other, right],  # c = 2; votes 0.5001 x2, 0.7 x2: tie, first
                ("b", "ATE", gold): [wrong, wrong, right, "no answer", other],  # c = 1; majority 0.7: wrong
                ("c", "PN", lack): ["LACK_CONDITION", wrong, "LACK_CONDITION", "x", "y"]}  # c = 2; lack wins
    records = [{"key": key, "sample": i, "type": task, "answer": answer, "response": response,
                "correct": protocol.is_correct(response, answer)}
               for (key, task, answer), responses in problems.items() for i, response in enumerate(responses)]
    table = pass_at_k.pass_and_majority(records, 5)
    p5 = {c: pass_at_k.pass_at_k(5, c, 5) for c in (1, 2)}
    assert table["ATE"] == pytest.approx({"pass@1": (2 / 5 + 1 / 5) / 2, "pass@5": (p5[2] + p5[1]) / 2, "maj@5": 0.5})
    assert table["PN"] == pytest.approx({"pass@1": 2 / 5, "pass@5": 1.0, "maj@5": 1.0})
    assert table["overall"]["pass@1"] == pytest.approx(evaluation.accuracy(records)["overall"])  # = today's accuracy
    assert table["overall"]["maj@5"] == pytest.approx(2 / 3)
    assert pass_at_k.pass_and_majority(records, 2)["overall"]["pass@2"] == pytest.approx(
        (pass_at_k.pass_at_k(5, 2, 2) * 2 + pass_at_k.pass_at_k(5, 1, 2)) / 3)


def test_the_command_line_prints_pass_and_majority_with_several_samples(tmp_path):
    out = run_script("eval.py", "--model", "oracle", "--data", caugym("base.json"), "--per-task", 1,
                     "--num-samples", 5, "--out", tmp_path / "run")
    assert "| task | pass@1 | pass@5 | maj@5 |" in out.stdout and "| overall | 100.0 | 100.0 | 100.0 |" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pass_and_majority"]["base"]["overall"]["pass@1"] == summary["accuracy"]["base"]["overall"]


def test_periodic_evaluation_logs_pass_and_majority(monkeypatch):
    """training.held_out_scores with --eval-samples 5 at a temperature: eval_acc (= pass@1), eval_pass@5 and
    eval_maj@5 of the scored samples (the sampler is replaced by fixed replies)."""
    import torch
    from nanocausal import training
    gold = '{"PROB": "0.5000"}'
    replies = {"p": [gold, '{"PROB": "0.1"}', '{"PROB": "0.1"}', "x", "y"], "q": [gold] * 5}
    records = [{"key": key, "index": i, "sample": s, "type": "ATE", "variant": "base", "answer": gold,
                "response": r, "correct": protocol.is_correct(r, gold)}
               for i, (key, responses) in enumerate(replies.items()) for s, r in enumerate(responses)]
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: records)
    config = training.TrainConfig(device="cpu", eval_samples=5, eval_temperature=0.6, show_completions=0)
    scores, _ = training.held_out_scores(torch.nn.Linear(1, 1), None, [], config)
    assert scores["eval_acc"] == pytest.approx((1 / 5 + 1) / 2)
    assert scores["eval_pass@5"] == 1.0 and scores["eval_maj@5"] == 0.5
    greedy = training.TrainConfig(device="cpu", eval_samples=1, eval_temperature=0.0, show_completions=0)
    assert set(training.held_out_scores(torch.nn.Linear(1, 1), None, [], greedy)[0]) == {"eval_acc", "eval_acc_ATE"}


@pytest.mark.parametrize("spec", ["tiny:0", "tiny:99999999999", "gen:base:0", "gen:base:99999999999", "gen:nope:3"])
def test_generated_sets_of_absurd_size_are_refused_by_their_data_entry(spec):
    with pytest.raises(ValueError, match=f"--data {spec}: expected"):
        evaluation.load_dataset(spec)


def test_a_file_whose_name_starts_with_tiny_is_read_as_a_file(tmp_path, monkeypatch):
    shutil.copy(caugym("base.json"), tmp_path / "tiny_set.json")
    monkeypatch.chdir(tmp_path)  # the spec as a user types it: a relative path
    _, items = evaluation.load_dataset("tiny_set.json")
    official = evaluation.load_dataset(caugym("base.json"))[1]
    assert [(it["problem"], it["answer"]) for it in items] == [(it["problem"], it["answer"]) for it in official]
