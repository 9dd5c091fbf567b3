"""Online reinforcement learning: GRPO (the paper's strongest method) and PPO. The model answers
causal problems, the official CauGym rule scores the answers, and the policy moves towards the
answers that scored better than their alternatives. One step (`step_fn` in train_rl; the loop
around it, shared with SFT, DPO and KTO, is training.train):

  1. Prompts: prompts_per_step problems from a seeded, resumable stream (rollout.prompt_stream;
     --curriculum adaptive: curriculum.AdaptiveStream, at the difficulty the learner needs).
  2. Rollouts: group_size completions per prompt at the training temperature (rollout.rollout).
  3. Rewards (rollout.score), plus DAPO's soft overlong penalty; --dynamic-sampling (DAPO) drops
     the groups whose rewards are all equal and samples more prompts to refill the step;
     --reward step adds each token's verified credit (step_rewards.py).
  4. What the loss compares against (the reference's log-probs, PPO's old values, the old
     policy's log-probs), then the advantages: one class per algorithm, `GRPO` and `PPO` below
     (formulas in grpo_losses.py and losses.py).
  5. Update (`update`): ppo_epochs passes, each mini_batches optimiser steps accumulated over
     micro-batches; every loss is normalised over its whole optimiser step, so accumulation equals
     one big batch.

Under torchrun (distributed.py) each rank samples a contiguous share of the step's prompts (a
group never spans two ranks; a prompt's samples are keyed by its index, so they are those of one
process) from a generation copy of the full weights, gathered in the compute dtype and freed after
the rollout. Every rank then holds the whole step's rollouts and trains the rows of its own
prompts, each loss divided by the step's global token count; the scoring passes run every row on
every rank (which makes PPO's whitening global). The value head is its own FSDP unit.
"""
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocausal import checkpoint, curriculum, distributed, lora, memory_plan, step_rewards, training
from nanocausal.config import RLConfig
from nanocausal.logprobs import token_logprobs
from nanocausal.grpo_losses import group_advantages, grpo_loss, overlong_penalty
from nanocausal.losses import gae, ppo_loss, ppo_rewards, whiten
from nanocausal.rewards import parse_rewards
from nanocausal.rollout import Rollouts, assemble, prompt_stream, rollout, score
from nanocausal.tokenizer import Tokenizer
from nanocausal.training import autocast


# -----------------------------------------------------------------------------
# Scoring passes: every row of the rollouts, micro-batch by micro-batch, without gradient


@torch.no_grad()
def per_token(rollouts, config: RLConfig, score_fn):
    """(R, T) float32 of score_fn(micro-batch) -> (B, width) over every rollout row."""
    out = torch.zeros_like(rollouts.sampler_logprobs)
    for index, mb in rollouts.micro_batches(range(len(out)), config.micro_batch_size, config.micro_batch_tokens):
        with autocast(config.device):
            scores = score_fn(mb)
        out[index, :scores.shape[1]] = scores.float()
    return out


def policy_logprobs(model, rollouts, config: RLConfig):
    """The policy's log-probs before the update, by the training forward: the ratio's "old" policy."""
    return per_token(rollouts, config, lambda mb: token_logprobs(model, mb.input_ids, None, mb.completion_mask,
                                                                 config.temperature, config.logits_chunk_size))


def reference_logprobs(ref_model, rollouts, config: RLConfig):
    """The reference's log-probs of the completion tokens (with LoRA: the policy, adapters off)."""
    with lora.disabled(ref_model):
        return policy_logprobs(ref_model, rollouts, config)


def old_values(model, value_head, rollouts, config: RLConfig):
    """PPO: the value head's estimates before the update."""
    return per_token(rollouts, config, lambda mb: values_of(value_head, model.hidden_states(mb.input_ids)))


def values_of(value_head, hidden):
    """(B, T) values in the layout of the log-probs: the value of the state before token t is read
    from the hidden state at t - 1 (the one that predicts token t). float32, outside autocast."""
    with torch.autocast(hidden.device.type, enabled=False):
        values = value_head(hidden[:, :-1].float()).squeeze(-1)
    return torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)

# -----------------------------------------------------------------------------
# The two algorithms. What one provides to the step (GRPO and PPO alike):
#   value_head                      a module trained beside the policy (its checkpoint too), or None
#   advantages(rollouts, rewards)   -> {Rollouts field: tensor}: "advantages" (PPO: and "returns")
#   loss(mb, logprobs, old_logprobs, entropies, hidden, num_tokens, num_sequences) -> (loss, metrics)
#                                   one micro-batch's loss, normalised over its whole optimiser step


class GRPO:
    """Group-relative advantages (grpo_losses.group_advantages) and the clipped GRPO loss (grpo_loss)."""
    value_head = None

    def __init__(self, config: RLConfig):
        self.config = config

    def advantages(self, rollouts, rewards):
        config = self.config
        scale = "none" if config.no_std_scaling else config.scale_rewards
        advantages = group_advantages(rewards, config.group_size, baseline=config.advantage_baseline, scale=scale)
        if rollouts.step_rewards is not None:  # --reward step: per-token advantages, the same loss
            advantages = step_rewards.grpo_advantages(advantages, rewards, rollouts.step_rewards,
                                                      rollouts.completion_mask, config.group_size, scale)
        return {"advantages": advantages}

    def loss(self, mb, logprobs, old_logprobs, entropies, hidden, num_tokens, num_sequences):
        c = self.config
        loss, metrics = grpo_loss(logprobs, old_logprobs, mb.advantages, mb.completion_mask, mb.ref_logprobs, c.beta,
                                  c.eps_low, c.eps_high, c.aggregation, max_completion_length=c.max_new_tokens,
                                  num_items_in_batch=num_tokens, num_sequences=num_sequences,
                                  importance_level=c.importance_level, objective=c.objective, entropies=entropies,
                                  entropy_coef=c.entropy_coef, top_entropy_quantile=c.top_entropy_quantile)
        metrics["clip_fraction"] = metrics.pop("clip_region")
        return loss, metrics


class PPO:
    """Per-token rewards with a KL penalty (losses.ppo_rewards), GAE on a value head's estimates
    (losses.gae), whitened advantages (losses.whiten), the clipped PPO loss (losses.ppo_loss)."""

    def __init__(self, config: RLConfig, hidden_size):
        self.config = config
        self.value_head = nn.Linear(hidden_size, 1).to(config.device)
        nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)

    def advantages(self, rollouts, rewards):
        """Reads old_values and ref_logprobs; the reward's KL penalty compares the sampler's log-probs
        with the reference's (none without a reference: kl_coef is 0 then)."""
        config, mask = self.config, rollouts.completion_mask
        ref = rollouts.sampler_logprobs if rollouts.ref_logprobs is None else rollouts.ref_logprobs
        token_rewards = ppo_rewards(rewards, rollouts.sampler_logprobs, ref, mask, config.kl_coef)
        if rollouts.step_rewards is not None:  # --reward step: each token's return-to-go is its verified credit
            token_rewards = token_rewards + step_rewards.ppo_shaping(rollouts.step_rewards, rewards, mask)
        first = int(mask.argmax(1).min())  # no completion starts earlier: GAE need not walk the prompts
        advantages, returns = gae(token_rewards[:, first:], rollouts.old_values[:, first:], mask[:, first:],
                                  config.gamma, config.lam)
        advantages = F.pad(whiten(advantages, mask[:, first:]), (first, 0))  # 0 on the columns GAE skipped
        return {"advantages": advantages, "returns": F.pad(returns, (first, 0))}

    def loss(self, mb, logprobs, old_logprobs, entropies, hidden, num_tokens, num_sequences):
        c = self.config
        return ppo_loss(logprobs, old_logprobs, mb.advantages, values_of(self.value_head, hidden), mb.old_values,
                        mb.returns, mb.completion_mask, c.clip_range, c.clip_range_value, c.value_coef,
                        num_items_in_batch=num_tokens)

# -----------------------------------------------------------------------------
# The update


def update(model, algorithm, optimizer, rollouts, config: RLConfig, step):
    """Step 5 of the module docstring. Returns the metrics (token-weighted means over every
    micro-batch) and the number of tokens run through."""
    mask = rollouts.completion_mask
    # A row of zero advantage adds nothing to the GRPO loss unless a KL term or an entropy bonus reads
    # it (nor does a masked truncated row): skip its forward/backward; the normaliser still counts it.
    every_row = config.algo == "ppo" or config.beta != 0 or config.entropy_coef != 0
    trained = ((rollouts.advantages.view(len(mask), -1).ne(0).any(1) | every_row) & mask.bool().any(1)).tolist()
    sums, grad_norms, tokens = {}, [], 0
    own = set(distributed.share(list(range(len(mask)))))  # this rank's rows: those of its prompts
    for epoch in range(config.ppo_epochs):
        order = np.random.default_rng([config.seed, step, epoch]).permutation(len(mask))
        for mini_batch in np.array_split(order, config.mini_batches):
            num_tokens = mask[mini_batch].sum()  # of the whole step, on every rank
            rows = [r for r in mini_batch.tolist() if trained[r] and r in own]
            chunks = list(rollouts.micro_batches(rows, config.micro_batch_size, config.micro_batch_tokens))
            filler = next(rollouts.micro_batches([min(own)], 1)) if distributed.world_size() > 1 else None
            for (_, mb), scale in distributed.pad_to_longest(chunks, filler):
                mb_mask = mb.completion_mask
                with autocast(config.device):
                    hidden = model.hidden_states(mb.input_ids)
                    # the entropies come out of the log-probs' logits chunks (no second matmul with the head)
                    logprobs, entropies = token_logprobs(model, mb.input_ids, None, mb_mask, config.temperature,
                                                        config.logits_chunk_size, hidden=hidden, return_entropy=True,
                                                        entropy_grad=config.entropy_coef != 0)
                    # strictly on-policy the old log-probs are these very ones, detached: the ratio is exactly 1
                    old_logprobs = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs
                    loss, metrics = algorithm.loss(mb, logprobs, old_logprobs, entropies, hidden, num_tokens,
                                                   len(mini_batch))
                (loss * scale).backward()
                if not scale:
                    continue
                with torch.no_grad():  # the sampler/trainer gap shows a sampler bug or a precision problem first
                    real = mb_mask.sum().clamp(min=1)
                    metrics["sampler_logprob_gap"] = ((logprobs.detach().float() - mb.sampler_logprobs).abs()
                                                      * mb_mask).sum() / real
                    metrics["entropy"] = (entropies.detach() * mb_mask).sum() / real
                n = metrics.pop("num_tokens")
                for k, v in {**metrics, "loss_tokens": 1.0}.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                tokens += mb.input_ids.numel()
            grad_norms.append(training.optimizer_step(optimizer, config.clip))
    sums = distributed.all_sums(sums, mask.device)  # over every rank's micro-batches
    weight = sums.pop("loss_tokens", None)
    metrics = {k: v / weight for k, v in sums.items()}
    metrics["grad_norm"] = torch.stack(grad_norms).mean()
    return metrics, distributed.all_sum(tokens)

# -----------------------------------------------------------------------------
# The step and the run


def rollout_metrics(scores, completions, truncated, group_size):
    """What the log shows of sampled rows: reward, accuracy, format rate, equal-reward groups, lengths."""
    rewards = scores["reward"]
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    grouped = rewards.view(-1, group_size)
    return {"reward": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else 0.0,
            **{name: scores[key].mean() for name, key in (("accuracy", "correct"), ("format_rate", "format_ok"))
               if key in scores},
            **{key: scores[key].mean() for key in scores if key.startswith("reward/") or key == "overlong_penalty"},
            **({"equal_reward_groups": (grouped == grouped[:, :1]).all(1).float().mean()} if group_size > 1 else {}),
            "completion_len": lengths.mean(), "completion_len_max": lengths.max(),
            "truncated": float(np.mean(truncated))}


def train_rl(config: RLConfig) -> training.TrainResult:
    """GRPO or PPO (config.algo) from config.model (RLConfig has checked its settings)."""
    torch.manual_seed(config.seed)
    memory_plan.check_fits(config, config.algo)
    model = training.start_run(config)
    device = config.device  # (under torchrun start_run sets this rank's GPU)
    ranks = distributed.world_size()
    # LoRA on one GPU: rollouts from a copy with the adapters merged (no adapter work per decoded
    # token), when the memory plan finds room for it in the generation phase
    merge_lora = ranks == 1 and memory_plan.plan(config, config.algo)["merge_lora"]
    tokenizer = Tokenizer.from_pretrained(config.model)
    pad_token_id = tokenizer.pad_token_id
    ref_model = None  # scored under lora.disabled: with LoRA it is the policy itself, adapters off
    if (config.beta if config.algo == "grpo" else config.kl_coef) != 0:
        ref_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        ref_model = model if lora.is_lora_model(model) else \
            checkpoint.load_model(config.model, dtype=ref_dtype, device=device).requires_grad_(False)
        if ranks > 1 and ref_model is not model:
            distributed.shard(ref_model, device, config.cpu_offload)
    algorithm = GRPO(config) if config.algo == "grpo" else PPO(config, model.config.hidden_size)
    value_head = algorithm.value_head
    if value_head is not None and config.resume:
        checkpoint.load_module(value_head, training.checkpoint_dir(config), "value_head")
    if value_head is not None and ranks > 1:
        distributed.shard(value_head, device, config.cpu_offload)
    extra_groups = [{"params": list(value_head.parameters()), "lr": config.value_lr, "weight_decay": 0.0}] \
        if value_head is not None else []
    optimizer = training.make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, extra_groups=extra_groups)
    context = model.config.max_position_embeddings
    if config.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt in the context of "
                         f"{config.model} ({context} tokens, max_position_embeddings)")
    stream = prompt_stream(config.seed, context - config.max_new_tokens, tokenizer, config.data, config.tasks,
                           config.variant, config.nodes) if config.curriculum == "fixed" else \
        curriculum.AdaptiveStream(config.seed, tokenizer, config.curriculum_target, config.variant)  # knob: its state
    if not config.resume:
        stream.ready()  # the first chunk of prompts, read (and checked) before the run writes anything

    reward_terms = parse_rewards(config.rewards, config.reward_weights) if config.rewards else None
    on_policy = config.ppo_epochs == 1 and config.mini_batches == 1  # the old policy is the one being trained
    timing = {}  # of the step's sampling rounds: seconds, generated tokens

    def step_fn(step):
        """One step: rollouts -> rewards -> advantages -> loss -> optimiser steps. Returns its
        metrics: what training.train logs."""
        timing.clear()
        # 1-3. prompts, rollouts, rewards (--dynamic-sampling: the informative groups of several rounds)
        step_examples = stream.next(config.prompts_per_step)
        rollouts, scores = sample(step_examples, 0, step)
        sampled, refill = (scores, rollouts.completions, rollouts.truncated), {}
        if config.dynamic_sampling:
            rollouts, scores, sampled, refill = dynamic_sampling(step_examples, rollouts, scores, step)
        if config.reward == "step":  # before truncated rows leave the mask: into the rollouts' (R, T) layout
            rollouts.step_rewards = step_rewards.batch_layout(scores["step_rewards"], rollouts.completion_mask)
        knobs = stream.observe(scores.get("correct", scores["reward"])) if config.curriculum == "adaptive" else {}
        truncated = torch.tensor(rollouts.truncated, device=device, dtype=torch.bool)
        if config.mask_truncated:  # the rows stay in their groups' statistics; their tokens leave the loss
            rollouts.completion_mask[truncated] = 0
        loss_tokens = rollouts.completion_mask.sum(1).float()
        started = time.time()
        # 4. what the loss compares against, then the advantages
        if value_head is not None:
            rollouts.old_values = old_values(model, value_head, rollouts, config)
        if ref_model is not None:
            rollouts.ref_logprobs = reference_logprobs(ref_model, rollouts, config)
        if not on_policy:
            rollouts.old_logprobs = policy_logprobs(model, rollouts, config)
        rollouts = replace(rollouts, **algorithm.advantages(rollouts, scores["reward"]))
        # 5. the loss and the optimiser steps
        update_metrics, train_tokens = update(model, algorithm, optimizer, rollouts, config, step)
        training_s = training.seconds_since(started, device)
        kl = {"kl": (rollouts.sampler_logprobs - rollouts.ref_logprobs)[rollouts.completion_mask.bool()].mean()} \
            if config.algo == "ppo" and ref_model is not None else {}  # PPO's reward penalty, as sampled
        return {**rollout_metrics(*sampled, config.group_size), **refill, **kl, **knobs,
                "truncated_loss_tokens": loss_tokens[truncated].sum() / loss_tokens.sum().clamp(min=1),
                **update_metrics, "generation_s": round(timing["generation_s"], 3),
                "reward_s": round(timing["reward_s"], 3), "training_s": round(training_s, 3),
                "generation_tokens_per_s": round(timing["generated_tokens"] / timing["generation_s"], 1),
                "training_tokens_per_s": round(train_tokens / training_s, 1)}

    def sample(step_examples, first_key, step):
        """One sampling round: the rollouts of step_examples (prompt keys from first_key on, so a
        refill round's prompts draw fresh random streams) and their scores."""
        started = time.time()
        mine = distributed.share(list(range(len(step_examples))))  # every prompt, in one process
        prompts = [step_examples[i]["prompt_ids"] for i in mine]
        generator = lora.merged_for_generation(model) if merge_lora else model if ranks == 1 else distributed.gathered_copy(
            model, on_every_rank=True, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
        with autocast(device):
            rollouts = rollout(generator, prompts, config.group_size, config.max_new_tokens, config.temperature,
                               config.top_p, config.top_k, config.seed * 100_003 + step, tokenizer.eos_token_ids,
                               pad_token_id, tokenizer.vocab_size, slots=config.rollout_slots,
                               prompt_keys=[first_key + i for i in mine], compile_decode=config.compile_decode)
        row_examples = [ex for ex in step_examples for _ in range(config.group_size)]
        if ranks > 1:  # every rank assembles the step's whole rollouts from the rows all ranks sampled
            del generator
            rollouts = assemble([ex["prompt_ids"] for ex in row_examples], *distributed.all_lists(
                rollouts.completions, rollouts.sampled_logprob_lists(), rollouts.truncated), pad_token_id, device)
        timing["generation_s"] = timing.get("generation_s", 0.0) + training.seconds_since(started, device)
        timing["generated_tokens"] = timing.get("generated_tokens", 0) + sum(len(c) for c in rollouts.completions)
        started = time.time()
        scores = score(row_examples, rollouts.completions, tokenizer, config.format_weight, config.strict, reward_terms)
        if config.reward == "step":  # verified per-token credit, completion-aligned (step_rewards.py)
            scores["step_rewards"], scores["reward/steps_verified"] = step_rewards.token_rewards(
                row_examples, rollouts.completions, tokenizer, scores["reward"], config.max_new_tokens,
                right=1 + config.format_weight)
        if config.overlong_buffer:
            scores["overlong_penalty"] = overlong_penalty([len(c) for c in rollouts.completions],
                                                          config.max_new_tokens, config.overlong_buffer,
                                                          config.overlong_penalty)
            scores["reward"] = scores["reward"] + scores["overlong_penalty"]
        timing["reward_s"] = timing.get("reward_s", 0.0) + time.time() - started
        return rollouts, {k: v.to(device) for k, v in scores.items()}

    def dynamic_sampling(examples, rollouts, scores, step):
        """DAPO's dynamic sampling: groups whose rewards are all equal (no advantage, no gradient) are
        dropped and prompts_per_step more prompts are rolled out, until prompts_per_step informative
        groups are kept or max_sampling_rounds rounds are done; then the step trains the first
        prompts_per_step kept groups, topped up with dropped ones (which add tokens to the normaliser
        but no gradient) when the rounds ran out. The counts are global (every rank holds every
        group). Returns the step's rollouts and scores, every sampled row's (scores, completions,
        truncated: for the log), and the counts."""
        size, n = config.group_size, config.prompts_per_step
        rounds = [(examples, rollouts, scores)]
        informative = lambda s: (s["reward"].view(-1, size) != s["reward"].view(-1, size)[:, :1]).any(1)  # noqa: E731
        while sum(int(informative(s).sum()) for *_, s in rounds) < n and len(rounds) < config.max_sampling_rounds:
            examples = stream.next(n)
            rounds.append((examples, *sample(examples, len(rounds) * n, step)))
        prompts = [ex["prompt_ids"] for examples, *_ in rounds for ex in examples for _ in range(size)]
        columns = [[x for _, r, _ in rounds for x in column(r)] for column in
                   (lambda r: r.completions, Rollouts.sampled_logprob_lists, lambda r: r.truncated)]
        every_score = {k: torch.cat([s[k] for *_, s in rounds]) for k in scores}
        kept = informative(every_score).tolist()
        chosen = ([g for g, k in enumerate(kept) if k] + [g for g, k in enumerate(kept) if not k])[:n]
        rows = [g * size + i for g in chosen for i in range(size)]
        rollouts = assemble([prompts[r] for r in rows], *([c[r] for r in rows] for c in columns), pad_token_id, device)
        return (rollouts, {k: v[rows] for k, v in every_score.items()}, (every_score, columns[0], columns[2]),
                {"sampling_rounds": len(rounds), "prompts_drawn": len(rounds) * n, "groups_kept": min(sum(kept), n)})

    return training.train(config, model, optimizer, step_fn, stream, tokenizer,
                          extra_modules={"value_head": value_head} if value_head is not None else None,
                          desc=config.algo)
