"""The adaptive curriculum (nanocausal/curriculum.py): the difficulty knob follows the pass rate,
the problems have the borrow count the knob asks for, and --resume restores the knob exactly."""
import json
import os

import torch

from nanocausal import caugym, curriculum
from nanocausal.rl import RLConfig, train_rl
from nanocausal.tokenizer import Tokenizer

TINY_BASE = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-base")


def test_the_knob_rises_above_the_target_pass_rate_and_falls_below_it():
    stream = curriculum.AdaptiveStream(0, tokenizer=None, target=0.5, knob=1.5)
    logged = stream.observe(torch.tensor([1.0, 1.0, 1.0, 0.0]))  # pass rate 0.75 > 0.5
    assert logged == {"curriculum_borrows": 1.5, "curriculum_next": 1.5 + curriculum.RATE * 0.25,
                      "curriculum_pass_rate": 0.75}
    stream.observe(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # 0.25 < 0.5: back down
    assert stream.state["borrows"] == 1.5
    stream.observe(torch.tensor([0.5, 0.5]))  # at the target it stays
    assert stream.state["borrows"] == 1.5
    for _ in range(5):
        stream.observe(torch.zeros(4))
    assert stream.state["borrows"] == 0.0  # clipped at the easiest
    for _ in range(5):
        stream.observe(torch.ones(4))
    assert stream.state["borrows"] == curriculum.MAX_BORROWS


def test_problems_have_the_borrows_the_knob_asks_for():
    for knob in range(curriculum.MAX_BORROWS + 1):
        items = [curriculum.draw(0, i, float(knob)) for i in range(20)]
        assert all(curriculum.borrows(it) == knob and it["kind"] == "effect" for it in items)
    mixed = [curriculum.borrows(curriculum.draw(1, i, 1.25)) for i in range(400)]
    assert set(mixed) == {1, 2} and 0.15 < mixed.count(2) / 400 < 0.35  # floor 1, and 2 a quarter of the time


def test_resume_restores_the_knob_and_the_problems_exactly(tmp_path):
    tokenizer = Tokenizer.from_pretrained(TINY_BASE)
    common = dict(model=TINY_BASE, curriculum="adaptive", prompts_per_step=2, group_size=2, max_new_tokens=8,
                  eval_every=0, device="cpu", lr=1e-3, warmup_steps=0, micro_batch_size=8, seed=3)
    train_rl(RLConfig(**common, steps=3, save_every=3, out_dir=str(tmp_path / "whole")))
    train_rl(RLConfig(**common, steps=2, save_every=2, out_dir=str(tmp_path / "cut")))
    train_rl(RLConfig(**common, steps=3, save_every=3, out_dir=str(tmp_path / "cut"), resume=True))
    rows = lambda run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
    knobs = lambda run: [(r["step"], r["curriculum_borrows"], r["curriculum_next"], r["reward"]) for r in rows(run)]
    assert knobs("whole") == knobs("cut") and len(knobs("whole")) == 3
    state = lambda run: torch.load(tmp_path / run / "checkpoint" / "trainer_state.pt", weights_only=False)["trainer_state"]["data"]
    assert state("whole") == state("cut") == {"borrows": knobs("whole")[-1][2], "drawn": 6}
    stream = curriculum.AdaptiveStream(3, tokenizer)
    stream.load_state_dict(state("cut"))
    again = curriculum.AdaptiveStream(3, tokenizer)
    again.load_state_dict(state("whole"))
    assert stream.next(4) == again.next(4)


def test_each_prompt_is_the_official_message_of_its_variant():
    """The stream's prompts are what evaluation scores: insufficient items carry the LACK_CONDITION hint."""
    tokenizer = Tokenizer.from_pretrained(TINY_BASE)
    for variant in ("base", "insufficient"):
        stream = curriculum.AdaptiveStream(0, tokenizer, variant=variant)
        items = [curriculum.draw(0, i, 1.0, variant) for i in range(3)]
        expected = [tokenizer.apply_chat_template([{"role": "user", "content": caugym.official_prompt(
            it["problem"], variant)}], add_generation_prompt=True) for it in items]
        assert [row["prompt_ids"] for row in stream.next(3)] == expected
        assert (caugym.LACK_HINT in tokenizer.decode(expected[0])) == (variant == "insufficient")
