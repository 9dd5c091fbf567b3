"""The tiny preset: genuine CauGym problems, exact worked solutions, and a Hugging Face folder that
nanocausal and transformers read the same way (weights, tokens, chat template)."""
import json
import random

import pytest
import torch

from nanocausal import caugym, tiny, tiny_base
from nanocausal.caugym import is_correct
from nanocausal.checkpoint import load_model
from nanocausal.problem_text import solve
from nanocausal.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    tiny_base.build_tiny(str(path), vocab_size=400, n_texts=400, hidden_size=64, num_layers=2, intermediate_size=128)
    return path


@pytest.mark.parametrize("variant", tiny.VARIANTS)
def test_problems_of_every_variant_and_query_are_solved_alike_by_the_official_solver(variant):
    """The causal engine's parser and exact solver (problem_text.solve) reads every tiny problem and
    gives its answer: both queries, every variant (insufficient: LACK_CONDITION)."""
    items = tiny.make_problems(120, seed=3, variant=variant, queries=tiny.QUERIES)
    assert {it["type"] for it in items} == set(tiny.QUERIES)
    assert {it["kind"] for it in items} == ({"effect"} if variant == "insufficient" else set(tiny.KINDS))
    for item in items:
        solved = solve(item["problem"])
        if variant == "insufficient":
            assert item["answer"] == solved == caugym.LACK, item["problem"]
        else:
            assert json.loads(solved) == json.loads(item["answer"]), item["problem"]
        if variant != "varied":  # (varied leaves the Instruction out one time in four)
            assert ("Instruction:" in item["problem"]) == (variant != "omitted")


def test_variants_change_only_what_they_say():
    """rephrased: other words; redundant: one more probability statement; insufficient: one fewer."""
    count = lambda text: text.lower().count("the probability of")
    for variant, extra in (("redundant", 1), ("insufficient", -1)):
        for item in tiny.make_problems(50, seed=8, variant=variant):
            assert count(item["problem"]) == (2 if item["kind"] == "effect" else 0) + extra, item["problem"]
    assert all(tiny.PREAMBLE_REPHRASED in it["problem"] for it in tiny.make_problems(5, seed=8, variant="rephrased"))
    # one query draws no random number for the choice: the ATE stream is what the tiny base was built on
    assert tiny.make_problems(20, seed=9) == tiny.make_problems(20, seed=9, queries=("ATE",))
    with pytest.raises(ValueError, match="tiny variant 'deconfounding'"):
        tiny.make_problems(1, seed=0, variant="deconfounding")


def test_the_varied_curriculum_never_shows_the_held_out_wording():
    """varied mixes the engine's wordings 0 and 1 sentence by sentence; heldout is wording 2 alone."""
    from nanocausal.problem_text import CONDS, EDGES, PREAMBLES
    varied = tiny.make_problems(300, seed=4, variant="varied", queries=tiny.QUERIES)
    heldout = tiny.make_problems(100, seed=4, variant="heldout", queries=tiny.QUERIES)
    held = [PREAMBLES[2], EDGES[2].split("{a}")[1].split("{b}")[0], CONDS[2].split("{c}")[0]]
    assert not any(phrase in it["problem"] for it in varied for phrase in held)
    assert all(PREAMBLES[2] in it["problem"] for it in heldout)
    assert any(CONDS[2].split("{c}")[0] in it["problem"] for it in heldout)
    for i in (0, 1):  # both training wordings, of every kind of sentence, occur
        assert any(PREAMBLES[i] in it["problem"] for it in varied)
        assert any(EDGES[i].split("{a}")[1].split("{b}")[0] in it["problem"] for it in varied)
        assert any(CONDS[i].split("{c}")[0] in it["problem"] for it in varied)
    omitted = sum("Instruction:" not in it["problem"] for it in varied) / len(varied)
    assert 0.15 < omitted < 0.35


def test_the_old_variants_render_byte_identical_through_the_engines_templates():
    """make_problem renders through problem_text's templates since issue 30; every variant that
    existed before renders the very texts it did (the digest was computed with the implementation
    before that change, commit 2b0f17a), so the default pipeline's data is unchanged."""
    import hashlib
    texts = [it["problem"] for v in tiny.VARIANTS[:5] for it in tiny.make_problems(200, seed=11, variant=v,
                                                                                   queries=tiny.QUERIES)]
    texts += [it["problem"] for it in tiny.make_problems(200, seed=0)]
    assert hashlib.sha256(json.dumps(texts).encode()).hexdigest() == \
        "dc5a03e310e436a47a0177e9f50acb3c5a33369369d797284490c30e66bbdb09"


def test_worked_solution_ends_with_the_right_answer():
    items = tiny.make_problems(200, seed=5, queries=tiny.QUERIES)
    for item in items:
        text = tiny.solution(item)
        assert is_correct(text, item["answer"])
        assert text.endswith(item["answer"])
    ett = next(it for it in items if it["type"] == "ETT" and it["kind"] == "effect")
    # ETT = P(y | factual x) - P(y | the x the question names): the second shown number minus the first
    first, second = (float(t[:6]) for t in ett["problem"].split(" is ")[1:3])
    assert tiny.solution(ett).splitlines()[1].startswith(f"ETT = {second:.4f} - {first:.4f}")


def test_column_subtraction_is_exact():
    rng = random.Random(0)
    pairs = [(0.9288, 0.8445), (0.1000, 0.0001), (0.5, 0.5)] + [
        tuple(sorted((rng.randint(0, 9999) / 1e4, rng.randint(0, 9999) / 1e4), reverse=True)) for _ in range(500)]
    for top, bottom in pairs:
        columns, result = tiny.subtraction_columns(top, bottom)
        assert abs(float(result) - (top - bottom)) < 1e-9
        assert len(columns) == 4
    assert tiny.subtraction_columns(0.9288, 0.8445) == (["8-0-5=3", "8-0-4=4", "12-0-4=8", "9-1-8=0"], "0.0843")
    assert tiny.subtraction_columns(0.8445, 0.9288) == (["8-0-5=3", "8-0-4=4", "12-0-4=8", "9-1-8=0"], "-0.0843")


def test_tokenizer_splits_digits_and_matches_transformers_chat_template(tiny_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_pretrained(str(tiny_folder))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tiny_folder))
    text = "P = 0.1234 - 0.5678 = -0.4444, 1905"
    pieces = [ours.decode([i]) for i in ours.encode(text)]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits and all(len(p) == 1 for p in digits), pieces
    assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": caugym.official_prompt(tiny.make_problems(1, seed=6)[0]["problem"])}]
    for generation_prompt in (True, False):
        want = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == list(want)
    assert ours.eos_token_ids[0] == ours.token_to_id("<|im_end|>")
    assert ours.decode(ours.apply_chat_template(messages)).endswith("<|im_start|>assistant\n")


def test_folder_loads_in_nanocausal_and_transformers_with_the_same_logits(tiny_folder):
    transformers = pytest.importorskip("transformers")
    ours = load_model(str(tiny_folder))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    assert ours.config.model_type == "qwen2" and ours.config.num_key_value_heads < ours.config.num_attention_heads
    tokenizer = Tokenizer.from_pretrained(str(tiny_folder))
    ids = torch.tensor([tokenizer.encode(tiny.make_problems(1, seed=7)[0]["problem"])[:64]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-4)


def test_careless_teacher_forgets_borrows_at_the_given_rate():
    always = lambda: True  # noqa: E731
    assert tiny.subtraction_columns(0.9288, 0.8445, always) == (["8-0-5=3", "8-0-4=4", "12-0-4=8", "9-0-8=1"], "0.1843")
    # 0.5000 - 0.0001: three borrows owed, all forgotten -> 0.5009 instead of 0.4999
    assert tiny.subtraction_columns(0.5, 0.0001, always)[1] == "0.5009"
    items = [it for it in tiny.make_problems(3000, seed=6) if it["kind"] == "effect"]
    rng = random.Random(0)
    owed = forgotten = 0
    for item in items:
        clean, careless = tiny.solution(item), tiny.solution(item, slip_rate=0.3, rng=rng)
        clean_cols, careless_cols = clean.split("\n")[2].split(), careless.split("\n")[2].split()
        owed += sum(c.split("-")[1] == "1" for c in clean_cols)
        forgotten += sum(a != b for a, b in zip(clean_cols, careless_cols) if a.split("-")[1] == "1")
        # a careless solution is consistent: its final answer is its own (possibly wrong) result
        result = careless.split("\n")[3][2:]
        assert json.loads(careless.split("\n")[4])["PROB"] == result
        assert (careless == clean) == is_correct(careless, item["answer"])
    assert abs(forgotten / owed - 0.3) < 0.03
