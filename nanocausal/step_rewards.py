"""Verified step rewards: the exact solver checks every intermediate claim of a response, and the
RL update gets per-token credit from where the first wrong claim sits (`--reward step`).

Outcome rewards (GRPO, PPO, every RL framework's rule-based reward) say whether the final answer is
right. Process supervision says which step went wrong: Lightman et al. 2023 ("Let's Verify Step by
Step", arXiv 2305.20050) label each step of a solution and find that step labels train a better
verifier than outcome labels; Wang et al. 2024 (Math-Shepherd, arXiv 2312.08935) estimate the labels
automatically and feed them to PPO as step rewards. Both need a LEARNED reward model, which can be
wrong. Our problems come from a causal engine that knows every intermediate value exactly, so here
the labels are verified, not estimated:

  toy format (nanocausal/tiny.py)   "path: yes|no", the head "ATE = a - b", every subtraction column
                                    "top-borrow-bottom=digit" (its digit AND its borrow) and "= result",
                                    each compared with the claim of the exact worked solution at the
                                    same position (the numbers come from nanocausal.problem_text.parse
                                    of the prompt: the solver, not the generator);
  CauGym format (solutions.py)      every "P(...) = value" read off the statements and the final
                                    "TASK = ... = value", within the format's rounding (|error| <= 1e-4),
                                    by `caugym_claims` given the generated Problem: its letters are the
                                    generator's topological order, which the prompt's text does not fix,
                                    so a run (`token_rewards`) credits toy-format responses only.

The first claim that disagrees is the first wrong step, at characters [s, e) of the response.
Per-token reward of completion i, token t (its characters end at end_t, start at start_t):

    r_it = R_right      if end_t <= s              (everything so far verified)
         = R_wrong      if start_t < e, end_t > s  (the first wrong step is blamed)
         = R_i          otherwise                  (after it: the outcome decides)

and r_it = R_i for every token when no intermediate claim is wrong, so a correct solution gets its
full outcome reward on every token and a response without intermediate steps gets exactly the
outcome reward. R_right = 1 + format_weight (a correct, well-formed answer), R_wrong = 0.

Into GRPO as per-token advantages (grpo_loss takes (B, T) advantages; its loss is unchanged):

    A_it = A_i + (r_it - R_i) / s_g,

A_i the usual group-relative outcome advantage, s_g the scale A_i was divided by (the group's std
+ eps; 1 when that is zero or with --scale-rewards none): the step evidence shifts a token's
advantage by its credit relative to the completion's outcome. A group whose outcomes are all equal
(no outcome signal, A_i = 0) still learns from its verified steps. Into PPO as the per-token
rewards whose return-to-go (gamma = 1) is r_it: rho_it = r_it - r_i,t+1 (r after the last token = 0),
which is PPO's usual reward R_i on the last token when no step is wrong.
"""
import re
from functools import lru_cache

import torch

from nanocausal import problem_text, scm, solutions, tiny

TOY_CLAIM = re.compile(r"(?m)^path: \w+|^(?:ATE|ETT) = [^\n]*|\d+-\d+-\d+=\d+|^= [^\n]*")
CAUGYM_CLAIM = re.compile(r"(P\([^)]*\)) = (?:1 - \d+\.\d+ = )?(-?\d+\.\d+)|^Step \d+: (\w+) = [^\n]*= (-?\d+\.\d+)$",
                          re.M)
TOLERANCE = 1e-4 + 1e-9  # 4-decimal numbers: a claim may differ from the exact value by the last digit's rounding

# ----------------------------------------------------------------------------- claims


@lru_cache(maxsize=4096)
def toy_reference(problem):
    """The exact worked solution (tiny.solution) of a tiny-curriculum problem text, from the solver:
    parse the text, take the formula the solver answers with; a - b are its two shown operands."""
    g, q, store, _ = problem_text.parse(problem)
    answer, tree = problem_text.first_answer(q, g, store)
    if tree is not None and (tree[0] != "-" or len(tree) != 3 or any(leaf[0] != "P" for leaf in tree[1:])):
        raise ValueError("not a tiny-curriculum problem: its formula is not a difference of two statements")
    numbers = None if tree is None else tuple(store.lookup(leaf[1], leaf[2]) for leaf in tree[1:])
    return tiny.solution({"answer": answer, "numbers": numbers, "type": q.task})


def toy_claims(response, problem):
    """[(start, end, ok)] for every intermediate claim of a toy-format response, in order: claim k
    is right when it is the exact solution's claim k (so a missing or extra column is wrong too)."""
    reference = [m.group(0).strip() for m in TOY_CLAIM.finditer(toy_reference(problem))]
    return [(m.start(), m.end(), k < len(reference) and m.group(0).strip() == reference[k])
            for k, m in enumerate(TOY_CLAIM.finditer(response))]


def caugym_claims(response, p):
    """[(start, end, ok)] for the "name = value" steps of a CauGym-format worked solution
    (nanocausal.solutions) of the generated Problem p: each P(...) read off the statements against
    the exact value of that leaf of the formula, the final "TASK = ... = v" against the answer."""
    exact = {}
    if p.answer != "LACK_CONDITION" and not scm.is_zero(p.q, p.scm.graph):
        tree = scm.formula(p.q, p.z, p.m)
        exact = {solutions._symbol(leaf): p.store.lookup(leaf[1], leaf[2]) for leaf in scm.leaves(tree)}
        exact[p.q.task] = scm.round_answer(scm.value_of(tree, p.store.lookup))
    claims = []
    for m in CAUGYM_CLAIM.finditer(response):
        name, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        claims.append((m.start(), m.end(), name in exact and abs(float(value) - exact[name]) <= TOLERANCE))
    return claims

# ----------------------------------------------------------------------------- per-token credit


def token_credit(claims, token_ends, outcome, right):
    """The per-token rewards r_it of the module docstring (R_wrong = 0), one per token;
    token_ends[t] is where token t's characters end in the response."""
    first_wrong = next(((s, e) for s, e, ok in claims if not ok), None)
    if first_wrong is None:
        return [float(outcome)] * len(token_ends)
    s, e = first_wrong
    return [right if end <= s else 0.0 if start < e else float(outcome)
            for start, end in zip([0] + token_ends[:-1], token_ends)]


@lru_cache(maxsize=None)  # a prompt is decoded once per run
def problem_of(prompt_ids: tuple, tokenizer):
    """The problem text of a tokenised chat prompt (from its "Input Info:" on), or None."""
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    return text[text.index("Input Info:"):] if "Input Info:" in text else None


def token_rewards(examples, completions, tokenizer, outcomes, width, right):
    """(R, width) per-token step rewards, completion-aligned (row r: its completion's tokens from
    column 0), and (R,) 1.0 where every intermediate claim was right. A response to a prompt that
    is not a tiny-curriculum problem has no claims: its outcome on every token."""
    rows, all_right = torch.zeros(len(completions), width), torch.ones(len(completions))
    for r, (example, ids) in enumerate(zip(examples, completions)):
        pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()
        problem = problem_of(tuple(example["prompt_ids"]), tokenizer)
        try:
            claims = toy_claims("".join(pieces), problem) if problem else []
        except (ValueError, KeyError):  # not a problem the toy solution format covers
            claims = []
        all_right[r] = float(all(ok for _, _, ok in claims))
        rows[r, :len(ids)] = torch.tensor(token_credit(claims, ends, float(outcomes[r]), right))
    return rows, all_right


def batch_layout(aligned, completion_mask):
    """Completion-aligned (R, W) values -> the rollout batch's (R, T) layout (completion positions)."""
    mask = completion_mask.bool()
    lengths = mask.sum(1, keepdim=True)
    out = torch.zeros(mask.shape, device=mask.device)
    out[mask] = aligned.to(mask.device)[torch.arange(aligned.shape[1], device=mask.device) < lengths]
    return out


def grpo_advantages(advantages, rewards, token_rewards, completion_mask, group_size, scale="group", eps=1e-4):
    """A_it = A_i + (r_it - R_i) / s_g on the completion tokens (module docstring); (R, T)."""
    grouped = rewards.view(-1, group_size).float()
    if scale == "group":
        s = (grouped.std(dim=1, keepdim=True, correction=1) + eps).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        s = (rewards.float().std(correction=1) + eps).expand(len(rewards))
    else:
        s = torch.ones(len(rewards), device=rewards.device)
    s = torch.where(s > 2 * eps, s, torch.ones_like(s)).unsqueeze(1)
    shift = (token_rewards - rewards.float().unsqueeze(1)) / s
    return (advantages.float().unsqueeze(1) + shift) * completion_mask


def ppo_shaping(token_rewards, rewards, completion_mask):
    """What to add to losses.ppo_rewards so that the return-to-go of token t is r_it, not R_i:
    rho_it = r_it - r_i,t+1 on the completion, minus the R_i that ppo_rewards put on the last token."""
    mask = completion_mask.float()
    following = torch.roll(token_rewards * mask, -1, dims=1) * torch.roll(mask, -1, dims=1)
    last = mask * (1 - torch.roll(mask, -1, dims=1))
    return (token_rewards - following) * mask - last * rewards.float().unsqueeze(1)

