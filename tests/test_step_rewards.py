"""Verified step rewards (nanocausal/step_rewards.py): a planted wrong step is found where it was
planted, in the toy and the CauGym worked-solution formats, and the per-token credit changes
exactly there; correct solutions get full credit; a response without steps gets the outcome
reward; the GRPO and PPO forms reduce to the outcome ones when no step is wrong."""
import json
import os
import random
import re

import pytest
import torch

from nanocausal import problems, solutions, step_rewards, tiny
from nanocausal.grpo_losses import group_advantages
from nanocausal.losses import ppo_rewards
from nanocausal.tokenizer import Tokenizer

TINY_BASE = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-base")
RIGHT, OUTCOME_WRONG = 1.1, 0.1  # a correct well-formed answer; a wrong well-formed one


def chars(text):
    """Each character its own token: token_ends = 1, 2, ..."""
    return list(range(1, len(text) + 1))


def effect_item(seed=0, min_borrows=2):
    items = [it for it in tiny.make_problems(200, seed=seed) if it["kind"] == "effect"]
    return next(it for it in items if tiny.solution(it).count("-1-") >= min_borrows)


def test_a_planted_wrong_column_is_the_credit_boundary_in_the_toy_format():
    item = effect_item()
    correct = tiny.solution(item)
    # plant: the third column written with a wrong digit (the same column the claims list counts)
    columns = re.findall(r"\d+-\d+-\d+=\d+", correct)
    wrong_column = columns[2][:-1] + str((int(columns[2][-1]) + 1) % 10)
    planted = correct.replace(" ".join(columns), " ".join(columns[:2] + [wrong_column] + columns[3:]))
    start = planted.index(wrong_column, planted.index(columns[1]) + len(columns[1]))
    claims = step_rewards.toy_claims(planted, item["problem"])
    first_wrong = next(c for c in claims if not c[2])
    assert first_wrong[:2] == (start, start + len(wrong_column))
    assert all(ok for s, _, ok in claims if s < start)  # everything before it verified right
    credit = step_rewards.token_credit(claims, chars(planted), OUTCOME_WRONG, RIGHT)
    assert credit[:start] == [RIGHT] * start
    assert credit[start:start + len(wrong_column)] == [0.0] * len(wrong_column)
    assert credit[start + len(wrong_column):] == [OUTCOME_WRONG] * (len(planted) - start - len(wrong_column))


def test_the_careless_teachers_forgotten_borrow_is_found_at_its_column():
    item = effect_item(min_borrows=1)
    slipped = tiny.solution(item, slip_rate=1.0, rng=random.Random(0))  # forgets every borrow it owes
    right_columns = re.findall(r"\d+-\d+-\d+=\d+", tiny.solution(item))
    slipped_columns = re.findall(r"\d+-\d+-\d+=\d+", slipped)
    k = next(i for i, (a, b) in enumerate(zip(right_columns, slipped_columns)) if a != b)
    claims = step_rewards.toy_claims(slipped, item["problem"])
    column_claims = [c for c in claims if re.fullmatch(r"\d+-\d+-\d+=\d+", slipped[c[0]:c[1]])]
    assert [ok for *_, ok in column_claims][:k + 1] == [True] * k + [False]
    assert next(c for c in claims if not c[2]) == column_claims[k]


def test_a_planted_wrong_value_is_the_credit_boundary_in_the_caugym_format():
    p = next(p for p in problems.problems(30, seed=1, tasks=("ATE", "NDE", "ETT"))
             if "From the statements" in solutions.solution(p))
    correct = solutions.solution(p)
    claims = step_rewards.caugym_claims(correct, p)
    assert claims and all(ok for *_, ok in claims)
    name, value = re.search(r"(P\([^)]*\)) = (?:1 - \d\.\d+ = )?(\d\.\d{4})", correct).groups()
    off = f"{(float(value) + 0.01) % 1:.4f}"
    at = correct.index(f"{name} = ") + len(f"{name} = ")
    at = correct.index(value, at)
    planted = correct[:at] + off + correct[at + len(value):]
    first_wrong = next(c for c in step_rewards.caugym_claims(planted, p) if not c[2])
    assert first_wrong[0] == correct.index(f"{name} = ") and first_wrong[0] < at < first_wrong[1]
    # within the format's rounding a value is still right; one unit further it is not
    nudged = lambda delta: correct[:at] + f"{float(value) + delta:.4f}" + correct[at + len(value):]
    assert all(ok for *_, ok in step_rewards.caugym_claims(nudged(0.0001), p))
    assert not all(ok for *_, ok in step_rewards.caugym_claims(nudged(0.0002), p))
    # a wrong final value (the reasoning's arithmetic slip) is blamed on the result step
    slip = solutions.solution(p, value=round(float(json.loads(correct.split("\n")[-1])["PROB"]) + 0.01, 4))
    wrong = [slip[s:e] for s, e, ok in step_rewards.caugym_claims(slip, p) if not ok]
    assert len(wrong) == 1 and wrong[0].startswith("Step ") and f"{p.q.task} = " in wrong[0]


def test_correct_solutions_get_full_credit_and_answers_without_steps_get_the_outcome():
    for item in tiny.make_problems(20, seed=5, queries=("ATE", "ETT")):
        text = tiny.solution(item)
        claims = step_rewards.toy_claims(text, item["problem"])
        assert all(ok for *_, ok in claims) and len(claims) == (1 if item["numbers"] is None else 7)
        assert step_rewards.token_credit(claims, chars(text), RIGHT, RIGHT) == [RIGHT] * len(text)
        answer_only = item["answer"]  # right or wrong, no intermediate step: exactly the outcome
        assert step_rewards.toy_claims(answer_only, item["problem"]) == []
        for outcome in (RIGHT, OUTCOME_WRONG, 0.0):
            assert step_rewards.token_credit([], chars(answer_only), outcome, RIGHT) == [outcome] * len(answer_only)


def test_token_rewards_through_the_tokenizer_put_the_boundary_on_the_wrong_tokens():
    tokenizer = Tokenizer.from_pretrained(TINY_BASE)
    item = effect_item()
    correct = tiny.solution(item)
    planted = correct.replace("path: yes", "path: no")  # the very first claim is wrong
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["problem"]}], add_generation_prompt=True)
    examples = [{"prompt_ids": prompt}] * 3
    completions = [tokenizer.encode(t) for t in (correct, planted, item["answer"])]
    rows, verified = step_rewards.token_rewards(examples, completions, tokenizer, torch.tensor([RIGHT, 0.1, 0.1]),
                                                width=200, right=RIGHT)
    assert verified.tolist() == [1.0, 0.0, 1.0]
    n = [len(c) for c in completions]
    assert rows[0, :n[0]].tolist() == pytest.approx([RIGHT] * n[0]) and rows[0, n[0]:].abs().sum() == 0
    blamed = len(tokenizer.encode("path: no"))  # the tokens of the wrong claim (the line is the first step)
    assert rows[1, :blamed].tolist() == [0.0] * blamed and rows[1, blamed:n[1]].tolist() == pytest.approx([0.1] * (n[1] - blamed))
    assert rows[2, :n[2]].tolist() == pytest.approx([0.1] * n[2])


def test_grpo_and_ppo_forms_reduce_to_the_outcome_ones_without_a_wrong_step():
    rewards = torch.tensor([1.1, 0.1, 0.1, 1.1, 0.1, 0.1, 0.1, 0.1])  # two groups of 4; the second all equal
    mask = torch.zeros(8, 6)
    mask[:, 2:5] = 1  # three completion tokens after a 2-token prompt
    outcome = rewards.unsqueeze(1) * mask
    adv = group_advantages(rewards, 4)
    same = step_rewards.grpo_advantages(adv, rewards, outcome, mask, 4)
    assert torch.allclose(same, adv.unsqueeze(1) * mask)
    stepped = outcome.clone()
    stepped[5, 2] = RIGHT  # row 5 (all-equal group): a verified first token, then a blamed one
    stepped[5, 3] = 0.0
    shifted = step_rewards.grpo_advantages(adv, rewards, stepped, mask, 4)
    assert shifted[5, 2:5].tolist() == pytest.approx([RIGHT - 0.1, -0.1, 0.0])  # scale 1: the group's std is 0
    assert torch.equal(shifted[:5], same[:5]) and torch.equal(shifted[6:], same[6:])
    # PPO: the return-to-go of every completion token (gamma = 1, no KL) is its step credit
    zero = torch.zeros(8, 6)
    per_token = ppo_rewards(rewards, zero, zero, mask, 0.0) + step_rewards.ppo_shaping(stepped, rewards, mask)
    to_go = per_token.flip(1).cumsum(1).flip(1)
    assert torch.allclose(to_go * mask, stepped * mask)
    assert torch.allclose(ppo_rewards(rewards, zero, zero, mask, 0.0) + step_rewards.ppo_shaping(outcome, rewards, mask),
                          ppo_rewards(rewards, zero, zero, mask, 0.0))
    # the batch layout puts completion-aligned rows onto the completion positions
    aligned = torch.arange(8 * 4, dtype=torch.float).view(8, 4)
    laid = step_rewards.batch_layout(aligned, mask)
    assert torch.equal(laid[:, 2:5], aligned[:, :3]) and laid[:, :2].abs().sum() == 0 and laid[:, 5:].abs().sum() == 0
