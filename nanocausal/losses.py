"""
The post-training losses of nanocausal: SFT, DPO, KTO and PPO, as pure functions of tensors (the GRPO
family, with its options, is nanocausal/grpo_losses.py, under the same conventions).

Nothing here sees a model: the trainers hand in per-token log-probs of the completion tokens
(B, T) (or their sums over the completion, (B,)). A loss returns `(loss, metrics)`: a 0-dim tensor
and detached 0-dim float32 tensors, left on the device so that logging them costs no host
synchronisation until a log line is printed.

Conventions shared by every function:
  - completion_mask (B, T) is 1 on completion tokens that count and 0 elsewhere (prompt, padding,
    anything after the first EOS). It may be bool, int or float.
  - all arithmetic is done in float32 (inputs are upcast): sums over thousands of tokens in bf16
    lose digits, and these tensors are tiny next to the logits.
  - masked positions are selected away with torch.where, never multiplied by 0, so a -inf or NaN
    log-prob on a padding position cannot leak into the loss.
  - losses that average over tokens take the token count of the whole optimiser step (every
    micro-batch accumulated before one optimizer.step(): num_target_tokens / num_items_in_batch),
    so that accumulating k micro-batches gives exactly the gradient of one big batch. Without it
    they average over this batch only.

References are given per function; "TRL" means huggingface/trl (the parity tests in
tests/test_losses.py run the installed TRL's own code on the same tensors).
"""

import torch
import torch.nn.functional as F


def _masked_sum(values, mask, dim=None):
    """Sum of values where mask is true (over everything, or along dim)."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    return picked.sum() if dim is None else picked.sum(dim)


def _check_shapes(reference_name, reference, **tensors):
    """ValueError (one line) naming the first of `tensors` whose shape is not `reference`'s."""
    for name, tensor in tensors.items():
        if tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                             f"(the shape of {reference_name})")


# -----------------------------------------------------------------------------
# SFT


def sft_loss(logprobs, completion_mask, num_target_tokens=None):
    """
    Supervised fine-tuning: token-level cross-entropy on the completion only.

        loss = -(1 / N) * sum_{i,t} mask_it * log pi(y_it | x_i, y_i,<t)

    logprobs: (B, T) log-probs of the target tokens; completion_mask: (B, T).
    N = num_target_tokens if given, else this batch's completion_mask.sum().

    Pinned conventions:
      - prompt tokens never count (completion-only loss, TRL SFTTrainer's completion_only_loss).
      - N is the target-token count of the whole optimiser step (module docstring); averaging
        per-micro-batch means would instead weight short micro-batches more (the bug transformers'
        Trainer fixed in 4.46 with num_items_in_batch).
      - N is clamped to >= 1 so an all-masked batch gives 0, not NaN.
    Source: the standard LM objective; TRL SFTTrainer + transformers Trainer (num_items_in_batch).

    metrics: nll (mean over this batch's target tokens, comparable across micro-batches),
    num_tokens (this batch's target tokens).
    """
    mask = completion_mask.bool()
    _check_shapes("completion_mask", completion_mask, logprobs=logprobs)
    logprobs = logprobs.float()
    num_tokens = mask.sum().float()
    normaliser = num_tokens if num_target_tokens is None else torch.as_tensor(num_target_tokens, dtype=torch.float32)
    total = _masked_sum(-logprobs, mask)
    loss = total / normaliser.clamp(min=1.0)
    metrics = {"nll": (total / num_tokens.clamp(min=1.0)).detach(), "num_tokens": num_tokens.detach()}
    return loss, metrics


# -----------------------------------------------------------------------------
# DPO


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0, loss_type="sigmoid", chosen_lengths=None, rejected_lengths=None):
    """
    Direct Preference Optimisation on summed completion log-probs, all (B,).

        h = (pi_c - ref_c) - (pi_r - ref_r)          log-ratio margin of a pair
        sigmoid: loss_i = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)
        ipo:     loss_i = (h / |y| - 1 / (2 * beta))^2   with per-token averaged log-ratios:
                 h / |y| := (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|
        loss = mean_i loss_i

    pi_c, pi_r: policy log-probs of the chosen / rejected completion, summed over completion tokens;
    ref_*: the same under the frozen reference model (no gradient flows into them).

    Pinned conventions:
      - eps = label_smoothing is conservative DPO (cDPO: the label is flipped with probability eps).
        eps = 0 is the DPO paper's loss. TRL < 1.0 applied label_smoothing in its "sigmoid" loss this
        way; TRL 1.x's "sigmoid" ignores it and keeps the same expression in its "aot"/"robust"
        branches.
      - "ipo" follows TRL and the IPO authors: the log-ratios are divided by the number of completion
        tokens (chosen_lengths, rejected_lengths, (B,), required) so that the squared loss and beta
        (tau in the paper) do not scale with completion length. The paper's Eq. 17 on summed
        log-probs is the special case lengths = 1. label_smoothing does not apply to IPO.
      - the loss is a mean over the B pairs (with equal micro-batches, divide by the number of
        accumulation steps).
    Sources: Rafailov et al. 2023, arXiv 2305.18290 (Eq. 7); Mitchell 2023, "A note on DPO with noisy
    preferences" (cDPO); Azar et al. 2023, arXiv 2310.12036 (IPO, Eq. 17); TRL DPOTrainer._compute_loss.

    metrics (as TRL logs them, on the summed log-probs): chosen_reward = mean beta * (pi_c - ref_c),
    rejected_reward, reward_margin = mean of their difference, reward_accuracy = share of pairs with
    chosen_reward > rejected_reward (strict), chosen_logps, rejected_logps (means).
    """
    _check_shapes("chosen_logps", chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)
    chosen_logratios = chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = rejected_logps.float() - ref_rejected_logps.float()

    if loss_type == "sigmoid":
        margin = beta * (chosen_logratios - rejected_logratios)
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss(loss_type='ipo') needs chosen_lengths and rejected_lengths "
                             "(completion token counts, (B,)) to average the log-ratios per token, as TRL does")
        if label_smoothing != 0.0:
            raise ValueError(f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only, not 'ipo'")
        if not beta > 0:  # the target margin 1 / (2 beta) needs beta > 0
            raise ValueError(f"dpo_loss(loss_type='ipo') needs beta > 0 (its target margin is 1 / (2 beta)), got {beta}")
        chosen_avg = chosen_logratios / chosen_lengths.float().clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_lengths.float().clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}, expected 'sigmoid' or 'ipo'")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "chosen_logps": chosen_logps.detach().float().mean(),
        "rejected_logps": rejected_logps.detach().float().mean(),
    }
    return losses.mean(), metrics


# -----------------------------------------------------------------------------
# KTO


def kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
    """
    Kahneman-Tversky Optimisation on unpaired examples, all tensors (B,).

        r_i  = pi_i - ref_i                               implied reward (log-ratio, summed log-probs)
        z0   = max(0, mean_j (kl_logps_j - ref_kl_logps_j))   reference point, detached
        desirable:   loss_i = lambda_D * (1 - sigma(beta * (r_i - z0)))
        undesirable: loss_i = lambda_U * (1 - sigma(beta * (z0 - r_i)))
        loss = (1 / B) * sum_i loss_i

    kl_logps / ref_kl_logps: summed log-probs of mismatched pairs (prompt i with the completion of
    another example of the batch) under the policy and the reference; their mean log-ratio is a
    biased but cheap estimate of KL(pi || ref). desirable: (B,) bool (TRL's `label`).

    Pinned conventions:
      - z0 is detached (TRL computes the KL log-probs under no_grad): it only shifts the point of
        comparison, no gradient flows through it. Clamped at 0 as in the paper.
      - aggregation is exactly TRL KTOTrainer's: the weighted per-example losses of both kinds are
        concatenated and averaged over the B examples of the batch (not a mean per kind). With
        distributed training TRL averages the KL estimate over ranks before clamping; here the
        batch is the whole batch.
      - lambda_D, lambda_U are desirable_weight, undesirable_weight; the paper suggests choosing them
        so that lambda_D * n_D / (lambda_U * n_U) lies in [1, 4/3].
    Sources: Ethayarajh et al. 2024, arXiv 2402.01306 (Eqs. 7-8); TRL KTOTrainer._compute_loss.

    metrics: z0, desirable_reward / undesirable_reward (mean beta * r over each kind; NaN when the
    batch has none of that kind, as TRL then skips the entry), reward_margin (their difference),
    num_desirable, num_undesirable.
    """
    _check_shapes("logps", logps, ref_logps=ref_logps, desirable=desirable)
    _check_shapes("kl_logps", kl_logps, ref_kl_logps=ref_kl_logps)
    desirable = desirable.bool()
    logratios = logps.float() - ref_logps.float()
    z0 = (kl_logps.float() - ref_kl_logps.float()).mean().clamp(min=0).detach()

    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()

    rewards = beta * logratios.detach()
    num_desirable = desirable.sum().float()
    num_undesirable = (~desirable).sum().float()
    desirable_reward = _masked_sum(rewards, desirable) / num_desirable
    undesirable_reward = _masked_sum(rewards, ~desirable) / num_undesirable
    metrics = {
        "z0": z0,
        "desirable_reward": desirable_reward,
        "undesirable_reward": undesirable_reward,
        "reward_margin": desirable_reward - undesirable_reward,
        "num_desirable": num_desirable,
        "num_undesirable": num_undesirable,
    }
    return loss, metrics


# -----------------------------------------------------------------------------
# PPO


def ppo_rewards(scores, logps, ref_logps, completion_mask, kl_coef):
    """
    Per-token rewards for PPO: a KL penalty on every completion token, plus the sequence score on
    the last real completion token.

        rewards_it = -kl_coef * (logp_it - ref_it) * mask_it  +  [t == last_i] * score_i

    scores: (B,) sequence rewards (from nanocausal/rewards.py); logps, ref_logps: (B, T) log-probs of
    the sampled tokens under the policy that sampled and the reference; returns (B, T).

    Pinned conventions: the KL estimator is k1 (logp - ref), the sampled log-ratio, as InstructGPT and
    TRL's PPOTrainer; last_i is the position of the last true entry of completion_mask (the EOS when
    there is one, else the last token before truncation); no gradient.
    Sources: Ouyang et al. 2022 (InstructGPT), arXiv 2203.02155, Eq. 2; Huang et al. 2024,
    arXiv 2403.17031 (the N+ implementation details of RLHF with PPO); TRL PPOTrainer (trl < 1.0).
    """
    mask = completion_mask.bool()
    _check_shapes("logps", logps, ref_logps=ref_logps, completion_mask=completion_mask)
    kl = logps.detach().float() - ref_logps.detach().float()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    last = mask.cumsum(1).argmax(1)  # (B,) last true entry (where the count first peaks)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.detach().float().unsqueeze(1))


@torch.no_grad()
def gae(rewards, values, completion_mask, gamma=1.0, lam=0.95):
    """
    Generalised Advantage Estimation over the completion tokens, (B, T) -> (advantages, returns).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the lambda-return, the value target)

    Pinned conventions:
      - masked positions contribute nothing: the recursion steps over them (t+1 means the next
        *real* token), and their advantages and returns are 0. With right padding this is the same as
        TRL's "zero the padded rewards and values" loop.
      - lam = 0 gives the one-step TD error; lam = 1 gives A_t = (discounted reward-to-go) - V_t,
        so R_t is the discounted reward-to-go.
      - no gradient: values are the rollout's (old) values, advantages and returns are targets.
    Sources: Schulman et al. 2015, arXiv 1506.02438 (Eq. 16); TRL PPOTrainer (trl < 1.0).
    """
    mask = completion_mask.bool()
    _check_shapes("rewards", rewards, values=values, completion_mask=completion_mask)
    rewards, values = rewards.float(), values.float()
    advantages = torch.zeros_like(rewards)
    running_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running_advantage = torch.where(real, delta + gamma * lam * running_advantage, running_advantage)
        next_value = torch.where(real, values[:, t], next_value)
        advantages[:, t] = running_advantage
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


@torch.no_grad()
def whiten(values, mask):
    """
    Normalise values to zero mean and unit variance over the true entries of mask.

        whitened = (x - mean) / sqrt(var + 1e-8)

    Pinned conventions (TRL's masked_whiten): mean and variance over masked entries only, the
    variance unbiased (ddof = 1), 1e-8 inside the square root; masked entries come out as 0.
    Source: TRL trl/core.py masked_whiten (trl < 1.0).
    """
    mask = mask.bool()
    values = values.float()
    count = mask.sum().float()
    mean = _masked_sum(values, mask) / count
    variance = _masked_sum((values - mean) ** 2, mask) / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def ppo_loss(logps, old_logps, advantages, values, old_values, returns, completion_mask, clip_range=0.2,
             clip_range_value=0.2, value_coef=0.1, num_items_in_batch=None):
    """
    PPO's clipped policy loss plus its clipped value loss, per completion token (B, T).

        ratio_t   = exp(logp_t - old_logp_t)
        policy_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_range, 1 + clip_range))
        V^clip_t  = old_V_t + clip(V_t - old_V_t, -clip_range_value, clip_range_value)
        value_t   = 0.5 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)
        loss      = sum_t mask_t * (policy_t + value_coef * value_t) / N

    logps, values: current policy log-probs and value-head outputs (with gradient); old_logps,
    old_values: the policy's and the value head's before this update (rollout.Rollouts);
    advantages: GAE advantages, already whitened (see whiten); returns: GAE returns (the value
    targets, not whitened).

    Pinned conventions (TRL PPOTrainer): both terms are masked token means; the value loss carries
    the 0.5 factor and takes the max (pessimistic) of the unclipped and clipped squared errors;
    value_coef = 0.1 is TRL's vf_coef default. N = num_items_in_batch (completion tokens of the
    whole optimiser step) or this batch's mask sum, as in grpo_loss. Advantages, returns and the old
    quantities are constants.
    Sources: Schulman et al. 2017, arXiv 1707.06347 (Eq. 7); Huang et al. 2024, arXiv 2403.17031;
    TRL PPOTrainer (trl < 1.0).

    metrics: policy_loss, value_loss (this batch's token means), clip_fraction (share of tokens where
    the policy clip binds), value_clip_fraction, approx_kl (mean of 0.5 * (logp - old_logp)^2),
    ratio_mean, num_tokens.
    """
    mask = completion_mask.bool()
    _check_shapes("completion_mask", completion_mask, logps=logps, old_logps=old_logps, advantages=advantages,
                  values=values, old_values=old_values, returns=returns)
    logps, values = logps.float(), values.float()
    old_logps, old_values = old_logps.detach().float(), old_values.detach().float()
    advantages, returns = advantages.detach().float(), returns.detach().float()

    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    policy_unclipped = -advantages * ratio
    policy_clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy_per_token = torch.max(policy_unclipped, policy_clipped)

    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    value_unclipped_error = (values - returns) ** 2
    value_clipped_error = (values_clipped - returns) ** 2
    value_per_token = 0.5 * torch.max(value_unclipped_error, value_clipped_error)

    num_tokens = mask.sum().float()
    normaliser = num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).float()
    loss = _masked_sum(policy_per_token + value_coef * value_per_token, mask) / normaliser.clamp(min=1.0)

    with torch.no_grad():
        token_count = num_tokens.clamp(min=1.0)
        metrics = {
            "policy_loss": _masked_sum(policy_per_token, mask) / token_count,
            "value_loss": _masked_sum(value_per_token, mask) / token_count,
            "clip_fraction": _masked_sum((policy_clipped > policy_unclipped).float(), mask) / token_count,
            "value_clip_fraction": _masked_sum((value_clipped_error > value_unclipped_error).float(), mask)
            / token_count,
            "approx_kl": _masked_sum(0.5 * log_ratio**2, mask) / token_count,
            "ratio_mean": _masked_sum(ratio, mask) / token_count,
            "num_tokens": num_tokens,
        }
    return loss, metrics
