"""
The GRPO family as pure functions of tensors: advantages, the clipped surrogate and its variants
(GSPO's sequence-level ratio, CISPO's clipped importance weight), top-entropy token selection, an
entropy bonus, and DAPO's soft overlong penalty.

Conventions are those of nanocausal/losses.py. "TRL" means huggingface/trl 1.16;
tests/test_grpo_losses.py runs TRL's own GRPOTrainer._compute_loss on the same tensors for every
option TRL has.
"""

import torch

from nanocausal.losses import _check_shapes, _masked_sum


def group_advantages(rewards, group_size, scale="group", baseline="mean", eps=1e-4):
    """
    Group-relative advantages: each completion is compared with the other completions of its prompt.

        baseline "mean": b_i = mean_g(r)                         (GRPO)
        baseline "rloo": b_i = (sum_g(r) - r_i) / (G - 1)        (RLOO: leave-one-out, = mean of the others)
        scale "group":   A_i = (r_i - b_i) / (std_g(r) + eps)    (GRPO)
        scale "batch":   A_i = (r_i - b_i) / (std_B(r) + eps)    (std over every reward of the step)
        scale "none":    A_i =  r_i - b_i                        (Dr. GRPO; TRL's RLOO default)

    rewards: (B,) with B = num_prompts * group_size, laid out group by group (the group_size
    completions of prompt 0 first, then prompt 1, ...), as the sampler returns them. Returns (B,).

    Pinned conventions:
      - std with ddof = 1 (Bessel's correction, TRL's nanstd), so group_size >= 2; eps = 1e-4 is added
        to the std (not under a square root): a group whose rewards are all equal gets advantage 0
        exactly under every option, and carries no signal.
      - the leave-one-out advantage is G / (G - 1) times the mean-baseline one: the same direction, an
        unbiased baseline (it does not depend on r_i), slightly larger steps.
      - "group" divides each group by its own spread, which up-weights prompts that are nearly always
        (or nearly never) solved; "batch" keeps the relative scale between prompts (TRL
        scale_rewards="batch", after Hu et al. 2025, REINFORCE++); "none" is Dr. GRPO's fix.
      - no gradient: rewards are data.
    Sources: Shao et al. 2024 (DeepSeekMath), arXiv 2402.03300, Sec. 4.1.2; Liu et al. 2025 (Dr. GRPO),
    arXiv 2503.20783; Ahmadian et al. 2024 (RLOO), arXiv 2402.14740, Eq. 5; TRL GRPOTrainer.
    _generate_and_score_completions (scale_rewards) and RLOOTrainer (the leave-one-out baseline).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantages: rewards has shape {tuple(rewards.shape)}; expected (num_prompts * "
                         f"group_size,) with group_size >= 2, got group_size={group_size}")
    if scale not in ("group", "batch", "none") or baseline not in ("mean", "rloo"):
        raise ValueError(f"group_advantages: scale={scale!r}, baseline={baseline!r}; expected scale in "
                         "('group', 'batch', 'none') and baseline in ('mean', 'rloo')")
    grouped = rewards.detach().float().view(-1, group_size)  # (num_prompts, group_size)
    if baseline == "mean":
        advantages = grouped - grouped.mean(dim=1, keepdim=True)
    else:
        advantages = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True, correction=1) + eps)
    elif scale == "batch":
        advantages = advantages / (grouped.std(correction=1) + eps)
    return advantages.view(-1)


def overlong_penalty(lengths, max_new_tokens, buffer, penalty=1.0):
    """
    DAPO's soft overlong punishment, added to the reward of each completion, (B,) -> (B,).

        pen(L) = 0                                      L <= L_max - buffer
                 -penalty * (L - (L_max - buffer)) / buffer     L_max - buffer < L <= L_max
                 -penalty                               L > L_max

    lengths: completion lengths in tokens; L_max = max_new_tokens. A completion that hits the budget
    gets -penalty: linear from 0 to -penalty over the last `buffer` tokens of the budget, so the
    policy learns that running long costs before it is cut, rather than the cliff of a truncated
    answer scored wrong. Never a bonus for short answers.
    Sources: Yu et al. 2025 (DAPO), arXiv 2503.14476, Eq. 13; TRL get_soft_overlong_punishment
    (penalty 1; here times `penalty`, verl's overlong_penalty_factor).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong_penalty: buffer={buffer} must be in 1..max_new_tokens={max_new_tokens}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    over = (lengths - (max_new_tokens - buffer)).clamp(min=0) / buffer
    return -penalty * over.clamp(max=1.0)


def high_entropy_mask(entropies, completion_mask, quantile):
    """
    The tokens that carry the policy loss under top-entropy training: those whose entropy is at
    least the (1 - quantile) quantile of the completion tokens' entropies, (B, T) bool.

        tau = Quantile_{1 - q}({H_it : mask_it}),   keep_it = mask_it and H_it >= tau

    Wang et al. 2025 find that a minority of "forking" tokens (high entropy) carry the useful RL
    signal; q = 0.2 trains on the top 20 %. Pinned conventions (TRL get_high_entropy_mask):
    torch.quantile's linear interpolation, ties kept (>=), quantile taken over the tokens of the
    batch given (a micro-batch: TRL gathers the micro-batch of every process; here one process's),
    so with accumulation it is a per-micro-batch threshold. No gradient.
    Sources: Wang et al. 2025, "Beyond the 80/20 rule", arXiv 2506.01939; TRL top_entropy_quantile.
    """
    mask = completion_mask.bool()
    entropies = entropies.detach().float()
    if not mask.any():
        return torch.zeros_like(mask)
    return mask & (entropies >= torch.quantile(entropies[mask], 1 - quantile))


def grpo_loss(logps, old_logps, advantages, completion_mask, ref_logps=None, beta=0.0, eps_low=0.2,
              eps_high=0.2, aggregation="token_mean", max_completion_length=None, num_items_in_batch=None,
              num_sequences=None, importance_level="token", objective="clip", entropies=None, entropy_coef=0.0,
              top_entropy_quantile=1.0):
    """
    GRPO's clipped surrogate with an optional k3 KL penalty, per completion token (B, T).

        w_it  = exp(logp_it - old_logp_it)                              importance_level "token"
        w_i   = exp(sum_t mask_it (logp_it - old_logp_it) / |o_i|)      "sequence" (GSPO; w_i for each t)
        clip:  l_it = -min(w * A_i, clip(w, 1 - eps_low, 1 + eps_high) * A_i)
        cispo: l_it = -sg(min(w, 1 + eps_high)) * A_i * logp_it          (sg: stop-gradient)
        l_it += beta * (exp(ref_it - logp_it) - (ref_it - logp_it) - 1)
        token_mean:    loss = sum_{i,t} m_it * l_it / N_tokens
        sequence_mean: loss = sum_i (sum_t m_it * l_it / |o_i|) / N_seqs
        constant:      loss = sum_{i,t} m_it * l_it / (N_seqs * max_completion_length)
        loss -= entropy_coef * sum_{i,t} e_it * H_it / N_tokens          (entropy bonus)

    m_it is completion_mask, or with top_entropy_quantile q < 1 only its highest-entropy tokens for
    the policy term (high_entropy_mask; e_it the same mask; the KL term and the normalisers keep
    the whole completion_mask).

    logps: (B, T) current policy log-probs (with gradient); old_logps: (B, T) log-probs of the
    policy before this update (strictly on-policy logps.detach() itself: ratio = 1); advantages:
    (B,) or (B, T); ref_logps: (B, T) reference log-probs, needed when beta != 0; entropies: (B, T) token entropies of the policy,
    needed by top_entropy_quantile < 1 and entropy_coef != 0 (with gradient for the bonus).

    Pinned conventions:
      - N_tokens = num_items_in_batch (completion tokens of the whole optimiser step) or this batch's
        mask sum; N_seqs = num_sequences (sequences of the whole step) or B. Passing the step totals
        makes the sum of the micro-batch losses equal the loss of the full batch (all aggregations).
      - "token_mean" (default) weighs every token equally across the step: TRL loss_type="dapo"
        (with num_items_in_batch) or "bnpo" (without); DAPO's token-level loss.
      - "sequence_mean" is the GRPO paper's 1/G sum_i 1/|o_i| sum_t: TRL loss_type="grpo". It favours
        short correct answers and long wrong ones (the length bias Dr. GRPO points out).
      - "constant" divides by a constant, the generation budget max_completion_length (required):
        Dr. GRPO, TRL loss_type="dr_grpo".
      - "sequence" (GSPO) is the geometric mean of the token ratios, one per completion, clipped per
        completion: a few off-policy tokens cannot swing a long sequence's weight, and every token of
        a completion gets the same gradient weight w_i * A_i / |o_i|. GSPO's paper uses it with
        "sequence_mean" (then the loss is per sequence); with "token_mean" longer completions weigh
        more (TRL warns about the same). Its clipping range is much narrower in the paper (3e-4, 4e-4).
      - "cispo" never drops a token's gradient: the weight is clipped (above only, as MiniMax-M1
        sets eps_low to infinity) and detached, multiplying a REINFORCE term A * logp. The cap is
        1 + eps_high (MiniMax-M1's notation; TRL's loss_type="cispo" caps at epsilon_high itself, so
        TRL's epsilon_high = 5 is eps_high = 4 here). With importance_level "sequence", w_i.
      - the KL term is the k3 estimator of KL(pi || ref), unbiased and always >= 0, added per token
        before aggregation (as the GRPO paper and TRL), not folded into the reward. beta = 0 by
        default, so no reference model is needed.
      - the entropy bonus is a token mean over the policy-loss tokens with the token_mean normaliser
        N_tokens whatever the aggregation (TRL: over its micro-batch's tokens, divided by the
        accumulation steps, which is the same for one micro-batch and q = 1).
      - advantages, old_logps and ref_logps are constants (detached here); eps_high > eps_low is
        DAPO's "clip-higher".
    Sources: Shao et al. 2024, arXiv 2402.03300 (Eq. 3); Yu et al. 2025 (DAPO), arXiv 2503.14476;
    Liu et al. 2025 (Dr. GRPO), arXiv 2503.20783; Zheng et al. 2025 (GSPO), arXiv 2507.18071, Eqs. 5-7;
    MiniMax 2025 (MiniMax-M1, CISPO), arXiv 2506.13585, Eq. 4; Wang et al. 2025, arXiv 2506.01939;
    Schulman 2020, "Approximating KL divergence" (k3); TRL GRPOTrainer._compute_loss.

    metrics (masked token means over this batch, as TRL, so they compare across micro-batches):
    policy_loss (the policy term alone, without KL or entropy), ratio_mean, clip_low (share of
    tokens with w < 1 - eps_low and A < 0: the clip binds), clip_high (w > 1 + eps_high and A > 0;
    for cispo: w > 1 + eps_high, A > 0, TRL's cispo_clip_ratio), clip_region (either), kl (when
    ref_logps is given, even with beta = 0), entropy_tokens (share of tokens carrying policy loss,
    when q < 1), num_tokens.
    """
    mask = completion_mask.bool()
    _check_shapes("completion_mask", completion_mask, logps=logps, old_logps=old_logps)
    logps = logps.float()
    old_logps = old_logps.detach().float()
    advantages = advantages.detach().float()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage per completion
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logps (B, T)")
    if (entropy_coef != 0.0 or top_entropy_quantile < 1.0) and entropies is None:
        raise ValueError("grpo_loss: entropy_coef and top_entropy_quantile need entropies (B, T)")

    log_ratio = torch.where(mask, logps - old_logps, torch.zeros_like(logps))
    if importance_level == "token":
        ratio = torch.exp(log_ratio)
    elif importance_level == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).float().clamp(min=1.0)
        ratio = torch.exp(log_ratio.sum(dim=1, keepdim=True) / lengths).expand_as(logps)
    else:
        raise ValueError(f"grpo_loss: unknown importance_level {importance_level!r}, expected 'token' or 'sequence'")

    if objective == "clip":
        clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        policy_per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    elif objective == "cispo":
        policy_per_token = -torch.clamp(ratio, max=1 + eps_high).detach() * advantages * logps
    else:
        raise ValueError(f"grpo_loss: unknown objective {objective!r}, expected 'clip' or 'cispo'")
    policy_mask = mask if top_entropy_quantile >= 1.0 else high_entropy_mask(entropies, mask, top_entropy_quantile)
    per_token = torch.where(policy_mask, policy_per_token, torch.zeros_like(policy_per_token))
    kl_per_token = None
    if ref_logps is not None:
        _check_shapes("completion_mask", completion_mask, ref_logps=ref_logps)
        ref_minus_logp = ref_logps.detach().float() - logps
        kl_per_token = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        if beta != 0.0:
            per_token = per_token + beta * kl_per_token

    num_tokens = mask.sum().float()
    token_normaliser = (num_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)).float()

    sequences = logps.shape[0] if num_sequences is None else num_sequences
    if aggregation == "token_mean":
        loss = _masked_sum(per_token, mask) / token_normaliser.clamp(min=1.0)
    elif aggregation == "sequence_mean":
        lengths = mask.sum(dim=1).float().clamp(min=1.0)
        loss = (_masked_sum(per_token, mask, dim=1) / lengths).sum() / sequences
    elif aggregation == "constant":
        if max_completion_length is None:
            raise ValueError("grpo_loss(aggregation='constant') needs max_completion_length "
                             "(the generation budget)")
        loss = _masked_sum(per_token, mask) / (sequences * max_completion_length)
    else:
        raise ValueError(f"grpo_loss: unknown aggregation {aggregation!r}, "
                         "expected 'token_mean', 'sequence_mean' or 'constant'")
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * _masked_sum(entropies.float(), policy_mask) / token_normaliser.clamp(min=1.0)

    with torch.no_grad():
        token_count = num_tokens.clamp(min=1.0)
        clip_low = (ratio < 1 - eps_low) & (advantages < 0) & (objective == "clip")  # cispo has no lower clip
        clip_high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = {
            "policy_loss": _masked_sum(policy_per_token, policy_mask) / token_count,
            "ratio_mean": _masked_sum(ratio, mask) / token_count,
            "clip_low": _masked_sum(clip_low.float(), mask) / token_count,
            "clip_high": _masked_sum(clip_high.float(), mask) / token_count,
            "clip_region": _masked_sum((clip_low | clip_high).float(), mask) / token_count,
            "num_tokens": num_tokens,
        }
        if kl_per_token is not None:
            metrics["kl"] = _masked_sum(kl_per_token, mask) / token_count
        if top_entropy_quantile < 1.0:
            metrics["entropy_tokens"] = policy_mask.sum().float() / token_count
    return loss, metrics
