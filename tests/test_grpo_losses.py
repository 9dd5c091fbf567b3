"""
Tests for the options of nanocausal/grpo_losses.py (the GRPO family): by hand from each formula,
and against the installed TRL's own GRPOTrainer._compute_loss / reward functions on random tensors
(forward and gradient) for every option TRL has (tests/test_losses.py's stand-in pattern).
"""
import math

import pytest
import torch

from nanocausal.grpo_losses import group_advantages, grpo_loss, high_entropy_mask, overlong_penalty
from test_losses import trl_grpo_loss


def random_inputs(seed, batch_size=8, length=6):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=generator)
    completion_mask = torch.arange(length)[None, :] < lengths[:, None]
    logps = (-3 * torch.rand(batch_size, length, generator=generator)).requires_grad_()
    old_logps = logps.detach() + 0.3 * torch.randn(batch_size, length, generator=generator)
    ref_logps = logps.detach() + 0.3 * torch.randn(batch_size, length, generator=generator)
    entropies = (2 * torch.rand(batch_size, length, generator=generator)).requires_grad_()
    advantages = group_advantages(torch.randn(batch_size, generator=generator), group_size=4)
    return logps, old_logps, ref_logps, entropies, advantages, completion_mask


# -----------------------------------------------------------------------------
# advantages


def test_rloo_and_batch_scaling_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 2.0, 2.0])
    # leave-one-out: r_i minus the mean of the three others
    expected = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 2 - 4 / 3, 0 - 2, 2 - 4 / 3, 2 - 4 / 3]
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none", baseline="rloo"), torch.tensor(expected))
    mean = sum(rewards.tolist()) / 8
    batch_std = math.sqrt(sum((r - mean) ** 2 for r in rewards.tolist()) / 7)
    centred = [1 - 0.5, -0.5, -0.5, 0.5, 2 - 1.5, -1.5, 0.5, 0.5]
    torch.testing.assert_close(group_advantages(rewards, 4, scale="batch"),
                               torch.tensor([c / (batch_std + 1e-4) for c in centred]))
    # a group with equal rewards has advantage 0 under every option
    for scale in ("group", "batch", "none"):
        for baseline in ("mean", "rloo"):
            assert group_advantages(torch.ones(8), 4, scale=scale, baseline=baseline).abs().max() == 0


def test_rloo_matches_trl():
    """TRL 1.16 RLOOTrainer's leave-one-out baseline (inline in _generate_and_score_completions, lines 1684-1692
    of trl/trainer/rloo_trainer.py: it needs a model and a sampler, so its lines are reproduced here);
    normalize_advantages=False is TRL's default."""
    pytest.importorskip("trl")
    rewards = torch.randn(24, generator=torch.Generator().manual_seed(8))
    grouped = rewards.view(-1, 4)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none", baseline="rloo"), rewards - baselines)


# -----------------------------------------------------------------------------
# the overlong penalty


def test_overlong_penalty_matches_trl_and_hand():
    lengths = [1, 79, 80, 81, 90, 99, 100]
    expected = [0, 0, 0, -0.5 * 1 / 20, -0.5 * 10 / 20, -0.5 * 19 / 20, -0.5]  # budget 100, buffer 20, penalty 0.5
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, 0.5), torch.tensor(expected))
    trl_rewards = pytest.importorskip("trl.rewards")
    trl_values = trl_rewards.get_soft_overlong_punishment(100, 20)([[0] * n for n in lengths])
    torch.testing.assert_close(overlong_penalty(lengths, 100, 20, 1.0), torch.tensor(trl_values))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 100, 0)


# -----------------------------------------------------------------------------
# GSPO, CISPO, top-entropy tokens, the entropy bonus: by hand


def test_sequence_level_ratio_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]], requires_grad=True)
    old_logps = torch.tensor([[-1.2, -2.4, -2.4], [-0.5, -0.9, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(logps, old_logps, advantages, mask, importance_level="sequence",
                              aggregation="sequence_mean", eps_low=0.2, eps_high=0.2)
    w0 = math.exp((0.2 + 0.4 - 0.6) / 3)  # = 1: inside the clip range
    w1 = math.exp((0.0 - 0.1) / 2)  # 0.951: inside too
    assert loss.item() == pytest.approx((-w0 * 1 + w1 * 1) / 2, abs=1e-6)  # float32 inputs
    loss.backward()
    # every token of a sequence gets the same gradient: d/dlogp_t of -w A / 2 = -w A / (2 |o|)
    torch.testing.assert_close(logps.grad, torch.tensor([[-w0 / 6] * 3, [w1 / 4, w1 / 4, 0.0]]))
    assert metrics["ratio_mean"].item() == pytest.approx((3 * w0 + 2 * w1) / 5, abs=1e-6)


def test_cispo_keeps_clipped_tokens_gradient():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old_logps = torch.tensor([[-2.0, -2.1]])  # ratios e^1 = 2.72 (capped at 1 + 0.5) and e^0.1
    advantages = torch.tensor([2.0])
    loss, metrics = grpo_loss(logps, old_logps, advantages, torch.ones(1, 2), objective="cispo", eps_high=0.5)
    weights = [1.5, math.exp(0.1)]
    assert loss.item() == pytest.approx(-(weights[0] * 2 * -1.0 + weights[1] * 2 * -2.0) / 2, rel=1e-6)
    loss.backward()
    # PPO's clip would zero the first token's gradient; CISPO keeps it, weighted by the capped ratio
    torch.testing.assert_close(logps.grad, torch.tensor([[-weights[0] * 2 / 2, -weights[1] * 2 / 2]]))
    assert metrics["clip_high"].item() == 0.5


def test_top_entropy_tokens_and_bonus_by_hand():
    entropies = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # 7 real entropies sorted: 0, .1, .2, .3, .5, .7, .9; the 0.6 quantile is at rank 3.6: .3 + .6 * .2 = .42
    kept = high_entropy_mask(entropies, mask, quantile=0.4)
    assert kept.tolist() == [[False, True, True, False], [False, True, False, False]]
    logps = torch.full((2, 4), -1.0, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics = grpo_loss(logps, logps.detach(), advantages, mask, entropies=entropies, entropy_coef=0.1,
                              top_entropy_quantile=0.4)
    # on-policy: each kept token contributes -A; the normaliser is every completion token (7)
    policy = (-1.0 - 1.0 + 2.0) / 7
    bonus = 0.1 * (0.9 + 0.5 + 0.7) / 7
    assert loss.item() == pytest.approx(policy - bonus, rel=1e-6)
    assert metrics["entropy_tokens"].item() == pytest.approx(3 / 7)
    loss.backward()
    torch.testing.assert_close(entropies.grad, -0.1 * kept.float() / 7)
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(logps, logps.detach(), advantages, mask, top_entropy_quantile=0.5)


# -----------------------------------------------------------------------------
# parity with TRL's GRPOTrainer._compute_loss


@pytest.mark.parametrize("trl_loss_type,aggregation,importance_level,quantile,entropy_coef", [
    ("grpo", "sequence_mean", "sequence", 1.0, 0.0),  # GSPO as its paper runs it
    ("bnpo", "token_mean", "sequence", 1.0, 0.0),
    ("cispo", "token_mean", "token", 1.0, 0.0),  # CISPO (TRL normalises it like dapo)
    ("cispo", "token_mean", "sequence", 1.0, 0.0),
    ("bnpo", "token_mean", "token", 0.3, 0.0),  # top-entropy tokens
    ("grpo", "sequence_mean", "sequence", 0.5, 0.0),
    ("bnpo", "token_mean", "token", 1.0, 0.05),  # the entropy bonus
    ("cispo", "token_mean", "token", 1.0, 0.05),
])
def test_grpo_options_match_trl(trl_loss_type, aggregation, importance_level, quantile, entropy_coef):
    pytest.importorskip("trl.trainer.grpo_trainer")
    logps, old_logps, ref_logps, entropies, advantages, mask = random_inputs(9)
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    objective = "cispo" if trl_loss_type == "cispo" else "clip"
    loss, metrics = grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=beta, eps_low=eps_low,
                              eps_high=eps_high, aggregation=aggregation, num_items_in_batch=mask.sum(),
                              importance_level=importance_level, objective=objective, entropies=entropies,
                              entropy_coef=entropy_coef, top_entropy_quantile=quantile)
    ours = torch.autograd.grad(loss, (logps, entropies), allow_unused=True)

    trl_eps_high = 1 + eps_high if objective == "cispo" else eps_high  # TRL's cispo cap is epsilon_high itself
    trl_loss, trl_metrics = trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, trl_loss_type, beta, eps_low,
                                          trl_eps_high, mask.shape[1], mask.sum(), importance_level=importance_level,
                                          entropies=entropies, top_entropy_quantile=quantile,
                                          entropy_coef=entropy_coef)
    theirs = torch.autograd.grad(trl_loss, (logps, entropies), allow_unused=True)

    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    if entropy_coef:
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0)
    if objective == "cispo":
        assert metrics["clip_high"].item() == pytest.approx(trl_metrics["cispo_clip_ratio"][-1], abs=1e-6)
    elif importance_level == "token":
        assert metrics["clip_region"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][-1], abs=1e-6)
    if quantile < 1:
        assert 0 < metrics["entropy_tokens"].item() < 1
