"""Offline post-training: SFT, DPO and KTO side by side. Each is a `*_backward` function (the
forward and backward passes of one optimiser step, returning its metrics) called by the step
function of train_offline, which the loop of training.py runs. The formulas are in losses.py.

What one optimiser step does, for all three:
  1. take batch_size * grad_accum examples from a seeded, resumable order (data.Batches) and cut
     them into micro-batches (data.micro_batches);
  2. backward every micro-batch, each loss scaled by the step's normaliser rather than its own, so
     the summed gradient is that of the whole step's mean loss, whatever the split (accumulation
     equals one big batch):
       SFT  cross-entropy on the completion tokens only, divided by N, the step's completion tokens;
       DPO  each micro-batch stacks the chosen rows on top of the rejected rows, so one forward pass
            of the policy scores both; the reference's summed log-probs come from a no-grad pass of
            the frozen reference (or the table Reference.precompute filled once); the loss of a
            micro-batch of n pairs is scaled by n / (pairs in the step);
       KTO  first the KL pairs of the whole step (prompt i with another example's completion) are
            scored without gradient by policy and reference, giving one reference point z0 for the
            step; then each micro-batch backwards kto_loss with that z0, scaled like DPO's;
  3. one clipped AdamW step (training.optimizer_step).
DPO's and KTO's metrics are computed once per step on all its examples. Batches are right-padded,
so the model gets no attention mask: a real token never attends to the padding after it, and
plain causal attention is the fast path (flash on CUDA); the padded positions are no target.
Under torchrun each rank takes its contiguous share of the step's examples (distributed.share);
the counts, z0's KL pairs and the metrics' log-probs are gathered over the ranks, so the N-rank
gradient is the one-process one.
"""
import torch
from tqdm import tqdm

from nanocausal import checkpoint, data, distributed, lora, memory_plan, training
from nanocausal.config import PreferenceConfig, SFTConfig
from nanocausal.logprobs import sequence_logprobs, token_logprobs
from nanocausal.losses import dpo_loss, kto_loss, sft_loss
from nanocausal.tokenizer import Tokenizer
from nanocausal.training import autocast


# -----------------------------------------------------------------------------
# The three steps


def sft_backward(model, batches, device):
    num_target_tokens = distributed.all_sum(sum(int(b["completion_mask"][:, 1:].sum()) for b in batches))
    total_loss = 0.0
    for batch, weight in distributed.pad_to_longest(batches):
        with autocast(device):
            logprobs = token_logprobs(model, batch["input_ids"], None, batch["completion_mask"])
        loss, _ = sft_loss(logprobs, batch["completion_mask"], num_target_tokens=num_target_tokens)
        (loss * weight).backward()
        total_loss += loss.detach() * weight
    return {"loss": distributed.all_sum(total_loss), "num_tokens": num_target_tokens}


def summed_logps(model, batch, device, kl=False):
    """log pi(completion | prompt) of every row of a collated batch (its KTO KL pairs with kl=True)."""
    prefix = "kl_" if kl else ""
    with autocast(device):
        return sequence_logprobs(model, batch[prefix + "input_ids"], None, batch[prefix + "completion_mask"])


def dpo_backward(policy, reference, batches, config: PreferenceConfig):
    num_pairs = distributed.all_sum(sum(len(b["indices"]) for b in batches))
    settings = dict(beta=config.beta, label_smoothing=config.label_smoothing, loss_type=config.loss_type)
    logps_seen, ref_seen, lengths_seen = [], [], []  # each (2, n) per micro-batch: row 0 chosen, row 1 rejected
    for batch, weight in distributed.pad_to_longest(batches):
        n = len(batch["indices"])
        logps = summed_logps(policy, batch, config.device)
        ref = reference.logps(batch)
        length = batch["completion_mask"].sum(-1)  # IPO averages the log-ratios per token
        loss, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], chosen_lengths=length[:n],
                           rejected_lengths=length[n:], **settings)
        (loss * n / num_pairs * weight).backward()
        if weight:
            logps_seen.append(logps.detach().view(2, n))
            ref_seen.append(ref.view(2, n))
            lengths_seen.append(length.view(2, n))
    # the step's metrics (and loss) over all its pairs at once: exact whatever the micro-batching
    logps, ref, lengths = (distributed.all_cat(torch.cat(seen, 1).float(), 1)
                           for seen in (logps_seen, ref_seen, lengths_seen))
    loss, metrics = dpo_loss(logps[0], logps[1], ref[0], ref[1], chosen_lengths=lengths[0],
                             rejected_lengths=lengths[1], **settings)
    return {"loss": loss, **metrics}


def kto_backward(policy, reference, batches, config: PreferenceConfig):
    num_examples = distributed.all_sum(sum(len(b["indices"]) for b in batches))
    settings = dict(beta=config.beta, desirable_weight=config.desirable_weight,
                    undesirable_weight=config.undesirable_weight)
    padded = distributed.pad_to_longest(batches)
    # The reference point z0 uses the KL pairs of the whole step, so every micro-batch sees the same z0.
    with torch.no_grad():
        kl_logps, ref_kl_logps = (distributed.all_cat(torch.cat([logps for logps, weight in pairs if weight]).float(), 0)
                                  for pairs in ([(summed_logps(policy, b, config.device, kl=True), w) for b, w in padded],
                                                [(reference.logps(b, kl=True), w) for b, w in padded]))
    logps_seen, ref_seen = [], []
    for batch, weight in padded:
        logps = summed_logps(policy, batch, config.device)
        ref = reference.logps(batch)
        loss, _ = kto_loss(logps, ref, kl_logps, ref_kl_logps, batch["desirable"], **settings)
        (loss * len(batch["indices"]) / num_examples * weight).backward()
        if weight:
            logps_seen.append(logps.detach())
            ref_seen.append(ref)
    logps, ref, desirable = (distributed.all_cat(torch.cat(seen).float(), 0) for seen in
                             (logps_seen, ref_seen, [b["desirable"].to(config.device).float() for b in batches]))
    loss, metrics = kto_loss(logps, ref, kl_logps, ref_kl_logps, desirable.bool(), **settings)
    return {"loss": loss, **metrics}


class Reference:
    """DPO's and KTO's reference: the summed log-probs of a micro-batch from the frozen model, or
    looked up in the table precompute() filled (one row per example: [chosen, rejected] for DPO,
    [completion, KL pair] for KTO). With LoRA the reference is the policy itself with its
    adapters switched off (lora.disabled): no second copy of the weights."""

    def __init__(self, model, device):
        self.model, self.device, self.table = model, device, None
        if not lora.is_lora_model(model):  # a separate frozen copy
            model.requires_grad_(False).eval()

    @torch.no_grad()
    def logps(self, batch, kl=False):
        if self.table is not None:  # rows of batch are examples batch["indices"] (DPO: chosen, then rejected)
            table = self.table[batch["indices"]]
            values = table[:, 1] if kl else table[:, 0] if "desirable" in batch else table.T.reshape(-1)
            return values.to(self.device)
        with lora.disabled(self.model):
            return summed_logps(self.model, batch, self.device, kl)

    @torch.no_grad()
    def precompute(self, rows, collate, pad_id, batch_size):
        table = torch.zeros(len(rows), 2)
        batches = data.cut(range(len(rows)), batch_size)
        for indices in tqdm(batches, desc="reference log-probs", leave=False):
            batch = data.to_device(collate([rows[i] for i in indices], pad_id), self.device)
            first = self.logps(batch).float().cpu()
            if "desirable" in batch:  # KTO: the example and its KL pair
                table[indices, 0], table[indices, 1] = first, self.logps(batch, kl=True).float().cpu()
            else:  # DPO: chosen rows then rejected rows
                table[indices, 0], table[indices, 1] = first[:len(indices)], first[len(indices):]
        self.table, self.model = table, None  # the reference model is no longer needed

# -----------------------------------------------------------------------------
# The trainer


def train_offline(config: SFTConfig) -> training.TrainResult:
    """SFT (an SFTConfig), or DPO or KTO (a PreferenceConfig: config.algo) against a frozen copy of
    config.model (or config.ref_model), on config.data or problems generated from config.seed."""
    algo = getattr(config, "algo", "sft")
    torch.manual_seed(config.seed)
    tokenizer = Tokenizer.from_pretrained(config.model)
    memory_plan.check_fits(config, algo)
    policy = training.start_run(config)
    if algo != "sft" and lora.is_lora_model(policy) and config.ref_model is None:
        reference = Reference(policy, config.device)
    elif algo != "sft":
        ref_model = checkpoint.load_model(config.ref_model or config.model,
                                          dtype=getattr(torch, config.dtype), device=config.device)
        if distributed.world_size() > 1:
            distributed.shard(ref_model, config.device, config.cpu_offload)
        reference = Reference(ref_model, config.device)
    max_length = min(config.max_length, policy.config.max_position_embeddings)
    examples = data.load_examples(config.data, algo) if config.data else data.generated_examples(
        algo, config.num_train, seed=config.seed, tasks=config.tasks, variant=config.variant, nodes=config.nodes)
    rows, collate = data.tokenize(examples, tokenizer, algo, max_length), data.COLLATE[algo]
    if algo == "sft":
        print(f"{len(rows)} SFT examples, {sum(len(r['ids']) for r in rows) / len(rows):.0f} tokens on average")
    else:
        if config.precompute_ref:
            reference.precompute(rows, collate, tokenizer.pad_token_id, config.batch_size)
        print(f"{len(rows)} {algo.upper()} examples; reference "
              f"{'precomputed' if config.precompute_ref else 'scored each step'}")
    optimizer = training.make_optimizer(policy, lr=config.lr, weight_decay=config.weight_decay)
    order = data.Batches(len(rows), config.batch_size * config.grad_accum, seed=config.seed)  # resumable

    def step_fn(step):  # the step's examples in micro-batches, their backward, one clipped AdamW step
        batches = data.micro_batches(rows, distributed.share(order.next()), collate, tokenizer.pad_token_id,
                                     config.batch_size, config.device, config.micro_batch_tokens)
        if algo == "sft":
            metrics = sft_backward(policy, batches, config.device)
        else:
            metrics = (dpo_backward if algo == "dpo" else kto_backward)(policy, reference, batches, config)
        metrics["grad_norm"] = training.optimizer_step(optimizer, config.clip)
        metrics["epoch"] = order.epoch
        # every token the step ran through the policy: each (B, T) attention mask, KTO's KL pairs included
        metrics["tokens"] = distributed.all_sum(
            sum(int(v.sum()) for b in batches for k, v in b.items() if k.endswith("attention_mask")))
        return metrics
    return training.train(config, policy, optimizer, step_fn, order, tokenizer, desc=algo)
