"""
Tests for nanocausal/losses.py.

Three kinds of checks:
  - by hand: each loss on a few explicit numbers, recomputed here from its formula with plain
    Python (math, loops), independently of the vectorised code under test;
  - invariances: gradient accumulation (one batch == micro-batches with the step's token count),
    the first on-policy GRPO update, GAE against a plain backward recursion;
  - parity with TRL: the installed TRL's own trainer methods run on a stand-in `self`
    (types.SimpleNamespace with the attributes the method reads) and a stand-in model that returns
    our log-probs, so TRL's code, not a retyped copy, computes the reference values.
"""

import math
import re
import types
from collections import defaultdict

import pytest
import torch

from nanocausal.grpo_losses import group_advantages, grpo_loss
from nanocausal.losses import dpo_loss, gae, kto_loss, ppo_loss, ppo_rewards, sft_loss, whiten


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x):
    return math.log(sigmoid(x))


# -----------------------------------------------------------------------------
# a tiny module that produces per-token log-probs, for the gradient-accumulation tests


class TinyLM(torch.nn.Module):
    def __init__(self, vocab_size=13, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.head = torch.nn.Linear(dim, vocab_size)

    def forward(self, input_ids, target_ids):
        logits = self.head(torch.tanh(self.embed(input_ids)))  # (B, T, V)
        return torch.log_softmax(logits, dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


def random_batch(batch_size=8, length=7, vocab_size=13, seed=0):
    """Token ids, targets and a right-padded completion mask of random lengths (1..length) per row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    target_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
    completion_mask = torch.arange(length)[None, :] < lengths[:, None]
    return input_ids, target_ids, completion_mask


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


# -----------------------------------------------------------------------------
# SFT


def test_sft_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    completion_mask = torch.tensor([[0, 1, 1], [1, 0, 0]])  # prompt token masked in row 0, padding in row 1
    loss, metrics = sft_loss(logprobs, completion_mask)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)
    assert metrics["num_tokens"].item() == 3
    loss, metrics = sft_loss(logprobs, completion_mask, num_target_tokens=10)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5) / 10)
    assert metrics["nll"].item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)  # per batch, whatever the normaliser
    # a -inf log-prob on a masked position must not leak into the loss or its gradient
    logprobs = torch.tensor([[-float("inf"), -2.0]], requires_grad=True)
    loss, _ = sft_loss(logprobs, torch.tensor([[0, 1]]))
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and logprobs.grad.tolist() == [[0.0, -1.0]]


def test_sft_gradient_accumulation_matches_one_batch():
    torch.manual_seed(0)
    model = TinyLM()
    input_ids, target_ids, completion_mask = random_batch()
    loss, _ = sft_loss(model(input_ids, target_ids), completion_mask)
    loss.backward()
    full_batch_grads = gradients(model)

    model.zero_grad()
    num_target_tokens = completion_mask.sum()
    for i in range(8):  # 8 micro-batches of one sequence each, gradients accumulated
        micro_loss, _ = sft_loss(model(input_ids[i:i + 1], target_ids[i:i + 1]), completion_mask[i:i + 1],
                                 num_target_tokens=num_target_tokens)
        micro_loss.backward()
    for full, accumulated in zip(full_batch_grads, gradients(model)):
        torch.testing.assert_close(accumulated, full, atol=1e-5, rtol=0)
    assert completion_mask.sum(1).unique().numel() > 1  # unequal lengths: a plain mean of means would differ


# -----------------------------------------------------------------------------
# DPO


def test_dpo_sigmoid_and_label_smoothing_by_hand():
    chosen, rejected = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-5.5, -6.0]), torch.tensor([-5.0, -5.0])
    beta = 0.5
    margins = [beta * ((-5.0 + 5.5) - (-6.0 + 5.0)), beta * ((-7.0 + 6.0) - (-4.0 + 5.0))]  # 0.75, -1.0
    for label_smoothing in (0.0, 0.1):
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                 label_smoothing=label_smoothing)
        expected = sum(-(1 - label_smoothing) * log_sigmoid(m) - label_smoothing * log_sigmoid(-m)
                       for m in margins) / 2
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["chosen_reward"].item() == pytest.approx((0.25 - 0.5) / 2)
    assert metrics["rejected_reward"].item() == pytest.approx((-0.5 + 0.5) / 2)
    assert metrics["reward_margin"].item() == pytest.approx((0.75 - 1.0) / 2)
    assert metrics["reward_accuracy"].item() == 0.5


def test_dpo_ipo_by_hand():
    chosen, rejected = torch.tensor([-6.0]), torch.tensor([-9.0])
    ref_chosen, ref_rejected = torch.tensor([-8.0]), torch.tensor([-8.0])
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.25, loss_type="ipo",
                       chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    assert loss.item() == pytest.approx((2.0 / 4 - (-1.0) / 2 - 1 / (2 * 0.25)) ** 2)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="ipo")


# -----------------------------------------------------------------------------
# KTO


def test_kto_by_hand():
    logps, ref_logps = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    kl_logps, ref_kl_logps = torch.tensor([-7.0, -9.0, -8.0]), torch.tensor([-7.5, -8.0, -7.9])
    desirable = torch.tensor([True, False, True])
    beta, weight_d, weight_u = 0.5, 1.0, 1.5
    loss, metrics = kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, beta=beta,
                             desirable_weight=weight_d, undesirable_weight=weight_u)
    z0 = max(0.0, ((0.5) + (-1.0) + (-0.1)) / 3)  # mean KL estimate is negative here -> 0
    assert z0 == 0.0 and metrics["z0"].item() == 0.0
    rewards = [1.0, -0.5, 0.0]
    expected = (weight_d * (1 - sigmoid(beta * (rewards[0] - z0))) + weight_u * (1 - sigmoid(beta * (z0 - rewards[1])))
                + weight_d * (1 - sigmoid(beta * (rewards[2] - z0)))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["desirable_reward"].item() == pytest.approx(beta * (1.0 + 0.0) / 2)
    assert metrics["undesirable_reward"].item() == pytest.approx(beta * -0.5)

    # a positive KL estimate shifts the reference point, and it is detached
    kl_logps = torch.tensor([-6.0, -8.0, -7.0], requires_grad=True)
    loss, metrics = kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, beta=beta)
    z0 = (1.5 + 0.0 + 0.9) / 3
    assert metrics["z0"].item() == pytest.approx(z0)
    expected = ((1 - sigmoid(beta * (1.0 - z0))) + (1 - sigmoid(beta * (z0 + 0.5))) + (1 - sigmoid(beta * -z0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert not loss.requires_grad  # nothing here requires grad except kl_logps, which is detached


# -----------------------------------------------------------------------------
# GRPO


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, four completions each
    advantages = group_advantages(rewards, group_size=4)
    std = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)  # ddof = 1
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    unscaled = group_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, group_size=3)


def grpo_by_hand(logps, old_logps, advantages, mask, ref_logps, beta, eps_low, eps_high):
    """Per-sequence lists of per-token GRPO losses, from the formula, in plain Python."""
    per_sequence = []
    for i in range(len(logps)):
        tokens = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old_logps[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss = -min(ratio * advantages[i], clipped * advantages[i])
            delta = ref_logps[i][t] - logps[i][t]
            tokens.append(loss + beta * (math.exp(delta) - delta - 1))
        per_sequence.append(tokens)
    return per_sequence


def test_grpo_loss_by_hand_for_each_aggregation():
    logps = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]]
    old_logps = [[-1.5, -1.9, -0.5], [-0.1, -1.0, -3.0]]  # ratios e^0.5, e^-0.1, 1 | e^-0.2, e^-0.2, (masked)
    ref_logps = [[-1.1, -2.5, -0.4], [-0.2, -1.0, -2.0]]
    advantages = [1.5, -0.7]
    mask = [[1, 1, 1], [1, 1, 0]]
    beta, eps_low, eps_high = 0.1, 0.1, 0.3
    per_sequence = grpo_by_hand(logps, old_logps, advantages, mask, ref_logps, beta, eps_low, eps_high)
    num_tokens = sum(len(s) for s in per_sequence)
    expected = {
        "token_mean": sum(sum(s) for s in per_sequence) / num_tokens,
        "sequence_mean": sum(sum(s) / len(s) for s in per_sequence) / 2,
        "constant": sum(sum(s) for s in per_sequence) / (2 * 5),
    }
    for aggregation, value in expected.items():
        loss, metrics = grpo_loss(torch.tensor(logps), torch.tensor(old_logps), torch.tensor(advantages),
                                  torch.tensor(mask), ref_logps=torch.tensor(ref_logps), beta=beta, eps_low=eps_low,
                                  eps_high=eps_high, aggregation=aggregation, max_completion_length=5)
        assert loss.item() == pytest.approx(value, rel=1e-6), aggregation
    # clip_high: token (0,0) has ratio e^0.5 > 1.3 with A > 0; clip_low: (1,0) and (1,1) have ratio e^-0.2 < 0.9
    # with A < 0; the other two real tokens have ratios e^-0.1 and 1 with A > 0: inside the clip range
    assert metrics["clip_high"].item() == pytest.approx(1 / 5)
    assert metrics["clip_low"].item() == pytest.approx(2 / 5)
    assert metrics["clip_region"].item() == pytest.approx(3 / 5)
    kl = [math.exp(ref - logp) - (ref - logp) - 1
          for logp_row, ref_row, mask_row in zip(logps, ref_logps, mask)
          for logp, ref, real in zip(logp_row, ref_row, mask_row) if real]
    assert metrics["kl"].item() == pytest.approx(sum(kl) / 5, rel=1e-6)


def test_grpo_first_on_policy_update():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 6) * 3).requires_grad_()
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.25])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    # on-policy the old log-probs are the policy's own, detached (what rl.update passes)
    loss, metrics = grpo_loss(logps, logps.detach(), advantages, completion_mask, aggregation="sequence_mean")
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_region"].item() == 0.0
    assert loss.item() == pytest.approx(-advantages.mean().item())
    # token_mean: every token carries its sequence's advantage; the gradient is the policy gradient -A * mask / N
    loss, _ = grpo_loss(logps, logps.detach(), advantages, completion_mask)
    lengths = completion_mask.sum(1).float()
    assert loss.item() == pytest.approx(-(advantages * lengths).sum().item() / lengths.sum().item())
    loss.backward()
    torch.testing.assert_close(logps.grad, -advantages[:, None] * completion_mask / completion_mask.sum())


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_grpo_gradient_accumulation_matches_one_batch(aggregation):
    torch.manual_seed(0)
    model = TinyLM()
    input_ids, target_ids, completion_mask = random_batch(seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        old_logps = model(input_ids, target_ids) + 0.3 * torch.randn(input_ids.shape, generator=generator)
    ref_logps = old_logps + 0.2 * torch.randn(input_ids.shape, generator=generator)
    advantages = torch.randn(8, generator=generator)
    settings = dict(beta=0.04, aggregation=aggregation, max_completion_length=7)

    loss, _ = grpo_loss(model(input_ids, target_ids), old_logps, advantages, completion_mask, ref_logps=ref_logps,
                        **settings)
    loss.backward()
    full_batch_grads = gradients(model)

    model.zero_grad()
    for i in range(8):
        rows = slice(i, i + 1)
        micro_loss, _ = grpo_loss(model(input_ids[rows], target_ids[rows]), old_logps[rows], advantages[rows],
                                  completion_mask[rows], ref_logps=ref_logps[rows], **settings,
                                  num_items_in_batch=completion_mask.sum(), num_sequences=8)
        micro_loss.backward()
    for full, accumulated in zip(full_batch_grads, gradients(model)):
        torch.testing.assert_close(accumulated, full, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# PPO


def gae_by_hand(rewards, values, mask, gamma, lam):
    """GAE per row by the textbook recursion over the real tokens only, in plain Python."""
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for i in range(len(rewards)):
        real = [t for t in range(len(rewards[i])) if mask[i][t]]
        running, next_value = 0.0, 0.0
        for t in reversed(real):
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            running = delta + gamma * lam * running
            advantages[i][t], returns[i][t] = running, running + values[i][t]
            next_value = values[i][t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.9, 1.0), (0.99, 0.5)])
def test_gae_matches_backward_recursion(gamma, lam):
    generator = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(5, 9, generator=generator), torch.randn(5, 9, generator=generator)
    completion_mask = torch.rand(5, 9, generator=generator) < 0.7  # holes too, not only right padding
    advantages, returns = gae(rewards, values, completion_mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = gae_by_hand(rewards.tolist(), values.tolist(), completion_mask.tolist(),
                                                        gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_advantages))
    torch.testing.assert_close(returns, torch.tensor(expected_returns))


def test_gae_edge_cases():
    rewards = torch.tensor([[0.0, 0.5, 2.0, 9.0]])
    values = torch.tensor([[0.3, -0.2, 1.0, 9.0]])
    completion_mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding
    gamma = 0.9
    # lam = 0: the one-step TD error r_t + gamma V_{t+1} - V_t, with V = 0 after the last real token
    advantages, _ = gae(rewards, values, completion_mask, gamma=gamma, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0 + gamma * -0.2 - 0.3, 0.5 + gamma * 1.0 + 0.2,
                                                          2.0 - 1.0, 0.0]]))
    # lam = 1: returns are the discounted reward-to-go, independent of the values
    _, returns = gae(rewards, values, completion_mask, gamma=gamma, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[0.0 + gamma * 0.5 + gamma**2 * 2.0, 0.5 + gamma * 2.0, 2.0,
                                                       0.0]]))


def test_ppo_rewards_by_hand():
    scores = torch.tensor([1.0, -1.0])
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -7.0]])
    ref_logps = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.25, 0.0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = ppo_rewards(scores, logps, ref_logps, completion_mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [-0.05, 0.025 - 1.0, 0.0]]))


def test_whiten_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    scale = 1 / math.sqrt(1.0 + 1e-8)  # mean 2, unbiased variance 1
    torch.testing.assert_close(whiten(values, mask), torch.tensor([[-scale, 0.0, scale, 0.0]]))


def test_a_misshaped_input_is_one_line_naming_it_and_the_shape_expected():
    pair, row, rows, wider = torch.zeros(2), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 4)
    for call, message in [
        (lambda: dpo_loss(pair, pair, row, pair), "ref_chosen_logps has shape (3,), expected (2,) (the shape of chosen_logps)"),
        (lambda: kto_loss(pair, pair, pair, row, pair.bool()), "ref_kl_logps has shape (3,), expected (2,) (the shape of kl_logps)"),
        (lambda: ppo_loss(rows, rows, rows, rows, rows, wider, rows),
         "returns has shape (2, 4), expected (2, 3) (the shape of completion_mask)"),
        (lambda: grpo_loss(rows, wider, pair, rows), "old_logps has shape (2, 4), expected (2, 3) (the shape of completion_mask)"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()


def test_ppo_loss_by_hand():
    logps, old_logps = [-1.0, -2.0, -0.5], [-1.4, -1.9, -0.5]
    advantages = [1.0, -2.0, 0.5]
    values, old_values, returns = [0.5, 1.0, -0.2], [0.1, 1.05, 0.0], [1.0, 0.0, 0.3]
    mask = [1, 1, 0]
    clip_range, clip_range_value, value_coef = 0.2, 0.2, 0.1
    policy, value = [], []
    for t in range(2):
        ratio = math.exp(logps[t] - old_logps[t])
        policy.append(max(-advantages[t] * ratio, -advantages[t] * min(max(ratio, 1 - clip_range), 1 + clip_range)))
        clipped_value = old_values[t] + min(max(values[t] - old_values[t], -clip_range_value), clip_range_value)
        value.append(0.5 * max((values[t] - returns[t]) ** 2, (clipped_value - returns[t]) ** 2))
    loss, metrics = ppo_loss(*(torch.tensor([x]) for x in (logps, old_logps, advantages, values, old_values, returns,
                                                            mask)), clip_range=clip_range,
                             clip_range_value=clip_range_value, value_coef=value_coef)
    assert loss.item() == pytest.approx((sum(policy) + value_coef * sum(value)) / 2, rel=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(sum(policy) / 2, rel=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(sum(value) / 2, rel=1e-6)
    assert metrics["clip_fraction"].item() == 0.5  # token 0: ratio e^0.4 > 1.2 with A > 0
    assert metrics["value_clip_fraction"].item() == 0.5  # token 0: the clipped value 0.3 is further from 1.0


# -----------------------------------------------------------------------------
# parity with TRL: TRL's own trainer methods on a stand-in self


def fake_accelerator():
    identity = lambda tensor, *args, **kwargs: tensor  # noqa: E731  (one process: gather/reduce are no-ops)
    return types.SimpleNamespace(device=torch.device("cpu"), num_processes=1, sync_gradients=True,
                                 gather=identity, gather_for_metrics=identity, reduce=identity)


def fake_model_returning(per_token_logps):
    """A model whose fused-LM-head output carries the given per-token log-probs (what TRL reads)."""
    def model(**kwargs):
        zeros = torch.zeros_like(per_token_logps.detach())
        return types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())
    return model


def random_completion_logps(num_rows, length, generator):
    """Per-token log-probs (rows, length), zero past each row's random length, and the TRL-style
    completion mask (rows, length + 1) whose first column is the (masked) prompt token."""
    lengths = torch.randint(1, length + 1, (num_rows,), generator=generator)
    shifted_mask = torch.arange(length)[None, :] < lengths[:, None]
    per_token = torch.where(shifted_mask, -3 * torch.rand(num_rows, length, generator=generator), 0.0)
    completion_mask = torch.cat([torch.zeros(num_rows, 1, dtype=torch.long), shifted_mask.long()], dim=1)
    return per_token.requires_grad_(), shifted_mask, completion_mask


def trl_dpo_loss(trainer_class, per_token, completion_mask, ref_chosen, ref_rejected, loss_type, beta, ls):
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), ref_model=None, accelerator=fake_accelerator(),
        args=types.SimpleNamespace(), aux_loss_enabled=False, router_aux_loss_coef=0.0, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=ls, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer_class._compute_loss(fake_self, fake_model_returning(per_token), inputs, return_outputs=False)
    return loss, fake_self._metrics["train"]


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_matches_trl(loss_type, label_smoothing):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    generator = torch.Generator().manual_seed(4)
    num_pairs, beta = 6, 0.3
    per_token, shifted_mask, completion_mask = random_completion_logps(2 * num_pairs, 5, generator)
    ref_chosen, ref_rejected = -8 * torch.rand(2, num_pairs, generator=generator)
    sequence_logps = per_token.sum(1)  # TRL's batch is [chosen; rejected]
    lengths = shifted_mask.sum(1)
    loss, metrics = dpo_loss(sequence_logps[:num_pairs], sequence_logps[num_pairs:], ref_chosen, ref_rejected,
                             beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                             chosen_lengths=lengths[:num_pairs], rejected_lengths=lengths[num_pairs:])
    (ours_grad,) = torch.autograd.grad(loss, per_token)

    if label_smoothing == 0.0:
        trl_loss, trl_metrics = trl_dpo_loss(trl_dpo.DPOTrainer, per_token, completion_mask, ref_chosen,
                                             ref_rejected, loss_type, beta, 0.0)
    else:
        # TRL 1.x's "sigmoid" ignores label_smoothing; its conservative-DPO expression
        # -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) lives in the "aot" branch, which sorts h over
        # the batch first. Sorting one pair is the identity, so TRL's "aot" on each pair alone is TRL's cDPO.
        # (the metrics do not depend on label_smoothing; they are compared in the other cases)
        trl_loss, trl_metrics = 0.0, None
        for i in range(num_pairs):
            rows = torch.tensor([i, num_pairs + i])
            pair_loss, _ = trl_dpo_loss(trl_dpo.DPOTrainer, per_token[rows], completion_mask[rows],
                                        ref_chosen[i:i + 1], ref_rejected[i:i + 1], "aot", beta, label_smoothing)
            trl_loss = trl_loss + pair_loss / num_pairs
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_grad, trl_grad, atol=1e-5, rtol=0)
    if trl_metrics is not None:
        for ours_key, trl_key in [("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                                  ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")]:
            assert metrics[ours_key].item() == pytest.approx(trl_metrics[trl_key][-1], abs=1e-5), ours_key


def test_kto_matches_trl():
    trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
    generator = torch.Generator().manual_seed(5)
    batch_size, beta = 7, 0.2
    per_token, _, completion_mask = random_completion_logps(batch_size, 5, generator)
    ref_logps = -8 * torch.rand(batch_size, generator=generator)
    desirable = torch.tensor([True, False, True, True, False, False, True])
    for kl_shift in (-1.0, 2.0):  # z0 clamped at 0, and z0 > 0
        kl_logps = -8 * torch.rand(batch_size, generator=generator)
        ref_kl_logps = kl_logps - kl_shift + 0.3 * torch.randn(batch_size, generator=generator)
        loss, metrics = kto_loss(per_token.sum(1), ref_logps, kl_logps, ref_kl_logps, desirable, beta=beta,
                                 desirable_weight=1.3, undesirable_weight=0.7)
        (ours_grad,) = torch.autograd.grad(loss, per_token)

        fake_self = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True), ref_model=None, accelerator=fake_accelerator(),
            args=types.SimpleNamespace(), aux_loss_enabled=False, router_aux_loss_coef=0.0, precompute_ref_logps=True,
            calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=1.3, undesirable_weight=0.7,
            _compute_kl_logps=lambda model, batch: kl_logps, _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
                  "completion_mask": completion_mask, "label": desirable, "ref_logps": ref_logps,
                  "ref_KL_logps": ref_kl_logps}
        trl_loss = trl_kto.KTOTrainer._compute_loss(fake_self, fake_model_returning(per_token), inputs,
                                                    return_outputs=False)
        (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
        trl_metrics = fake_self._metrics["train"]

        torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_grad, trl_grad, atol=1e-5, rtol=0)
        assert metrics["z0"].item() == pytest.approx(trl_metrics["kl"][-1], abs=1e-6)
        assert metrics["desirable_reward"].item() == pytest.approx(trl_metrics["rewards/chosen"][-1], abs=1e-5)
        assert metrics["undesirable_reward"].item() == pytest.approx(trl_metrics["rewards/rejected"][-1], abs=1e-5)
    assert metrics["z0"].item() > 0


def trl_group_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16's advantage computation. It sits inline in GRPOTrainer._generate_and_score_completions
    (trl/trainer/grpo_trainer.py, lines 2763-2787, multi_objective_aggregation="sum_then_normalize"), which
    needs a model, a sampler and reward functions, so its lines are reproduced here; nanstd is TRL's own."""
    from trl.trainer.utils import nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    else:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def test_group_advantages_match_trl():
    pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(6)
    rewards = torch.randn(24, generator=generator)
    rewards[8:12] = 1.0  # a group with no signal
    for scale_rewards in ("group", "batch", "none"):
        torch.testing.assert_close(group_advantages(rewards, 4, scale=scale_rewards),
                                   trl_group_advantages(rewards, 4, scale_rewards), atol=1e-5, rtol=0)


def trl_grpo_loss(per_token_logps, old_logps, ref_logps, advantages, completion_mask, loss_type, beta, eps_low,
                  eps_high, max_completion_length, num_items_in_batch, accumulation_steps=1, importance_level="token",
                  entropies=None, top_entropy_quantile=1.0, entropy_coef=0.0):
    entropies = torch.zeros_like(per_token_logps) if entropies is None else entropies
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=fake_accelerator(),
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=accumulation_steps),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (per_token_logps, entropies, None),
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=None,
        importance_sampling_level=importance_level, beta=beta, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=entropy_coef != 0.0, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)))
    from trl.trainer.grpo_trainer import GRPOTrainer
    fake_self.accelerator.pad_across_processes = lambda tensor, *args, **kwargs: tensor
    fake_self.get_high_entropy_mask = lambda *args: GRPOTrainer.get_high_entropy_mask(fake_self, *args)
    batch_size, length = per_token_logps.shape
    inputs = {"prompt_ids": torch.zeros(batch_size, 1, dtype=torch.long),
              "prompt_mask": torch.ones(batch_size, 1, dtype=torch.long),
              "completion_ids": torch.zeros(batch_size, length, dtype=torch.long),
              "completion_mask": completion_mask.long(), "advantages": advantages,
              "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": torch.as_tensor(num_items_in_batch, dtype=torch.float32)}
    from trl.trainer.grpo_trainer import GRPOTrainer
    loss = GRPOTrainer._compute_loss(fake_self, None, inputs)
    return loss, fake_self._metrics["train"]


@pytest.mark.parametrize("trl_loss_type,aggregation,beta", [("grpo", "sequence_mean", 0.0),
                                                            ("bnpo", "token_mean", 0.04),
                                                            ("dr_grpo", "constant", 0.04),
                                                            ("dapo", "token_mean", 0.0)])
def test_grpo_loss_matches_trl(trl_loss_type, aggregation, beta):
    pytest.importorskip("trl.trainer.grpo_trainer")
    generator = torch.Generator().manual_seed(7)
    batch_size, length, eps_low, eps_high = 8, 6, 0.2, 0.28
    lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
    completion_mask = torch.arange(length)[None, :] < lengths[:, None]
    per_token_logps = (-3 * torch.rand(batch_size, length, generator=generator)).requires_grad_()
    old_logps = per_token_logps.detach() + 0.3 * torch.randn(batch_size, length, generator=generator)
    ref_logps = per_token_logps.detach() + 0.3 * torch.randn(batch_size, length, generator=generator)
    advantages = group_advantages(torch.randn(batch_size, generator=generator), group_size=4)
    num_tokens = completion_mask.sum()

    loss, metrics = grpo_loss(per_token_logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=beta,
                              eps_low=eps_low, eps_high=eps_high, aggregation=aggregation, max_completion_length=length,
                              num_items_in_batch=num_tokens if trl_loss_type == "dapo" else None)
    (ours_grad,) = torch.autograd.grad(loss, per_token_logps)

    if trl_loss_type != "dapo":
        trl_loss, trl_metrics = trl_grpo_loss(per_token_logps, old_logps, ref_logps, advantages, completion_mask,
                                              trl_loss_type, beta, eps_low, eps_high, length, num_tokens)
    else:
        # DAPO normalises by the token count of the whole generation batch: split it into 4 accumulated
        # micro-batches, as TRL does with gradient_accumulation_steps = steps_per_generation = 4
        trl_loss, trl_metrics = 0.0, None  # metrics are per micro-batch here; compared in the other cases
        for rows in torch.arange(batch_size).chunk(4):
            micro_loss, _ = trl_grpo_loss(per_token_logps[rows], old_logps[rows], ref_logps[rows],
                                                      advantages[rows], completion_mask[rows], "dapo", beta, eps_low,
                                                      eps_high, length, num_tokens, accumulation_steps=4)
            trl_loss = trl_loss + micro_loss
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token_logps)

    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_grad, trl_grad, atol=1e-5, rtol=0)
    if trl_metrics is not None:
        for ours_key, trl_key in [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                                  ("clip_region", "clip_ratio/region_mean")]:
            assert metrics[ours_key].item() == pytest.approx(trl_metrics[trl_key][-1], abs=1e-6), ours_key
        assert metrics["clip_region"].item() > 0  # the clip does bind somewhere in this batch
        if beta != 0.0:
            assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][-1], abs=1e-6)
