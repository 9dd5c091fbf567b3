"""
Offline preference optimisation: DPO on (prompt, chosen, rejected) pairs, or KTO on unpaired
(prompt, completion, label) examples, against a frozen reference model (the starting model).

One GPU (bf16 autocast; pairs generated on the fly: worked solutions vs plausible wrong ones):

    python train_pref.py --algo dpo --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 4 \\
        --grad-accum 8 --steps 1000 --lr 5e-7 --beta 0.1 --activation-checkpointing --out-dir out/dpo
    python train_pref.py --algo kto --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 8 \\
        --grad-accum 4 --steps 1000 --lr 5e-7 --beta 0.1 --activation-checkpointing --out-dir out/kto

Laptop (CPU, a 135M model; reference log-probs computed once, then the reference is freed):

    python train_pref.py --algo dpo --model HuggingFaceTB/SmolLM2-135M-Instruct --num-train 128 \\
        --batch-size 2 --grad-accum 2 --steps 20 --lr 1e-6 --precompute-ref --eval-every 10 \\
        --eval-problems 8 --eval-max-new-tokens 256 --out-dir out/dpo-laptop

Usually one starts from an SFT checkpoint: --model out/sft/checkpoint. From files: --data dpo.jsonl
(prompt, chosen, rejected) or kto.jsonl (prompt, completion, label), e.g. written by
`python -m nanocausal.scm --format dpo --n 20000 --out dpo.jsonl`. Ctrl-C writes a checkpoint;
rerun with --resume to continue exactly.

How a step works (the formulas are in nanocausal/losses.py):
  DPO  each micro-batch stacks the chosen rows on top of the rejected rows, so one forward pass of
       the policy scores both; the reference's summed log-probs come from a no-grad pass of the frozen
       reference (or the table --precompute-ref filled once); the loss of a micro-batch of n pairs
       is scaled by n / (pairs in the step), so accumulation equals one big batch.
  KTO  first the KL pairs of the whole step (prompt i with another example's completion) are scored
       without gradient by policy and reference, giving one reference point z0 for the step; then
       each micro-batch backwards kto_loss with that z0, scaled like DPO's.
Metrics are computed once per step on all its examples: rewards, margins, accuracy (DPO), z0 (KTO).
The training loop itself (schedule, clipping, logging, evaluation, checkpoints) is train_sft.train.
"""

import argparse
import os

import torch
from tqdm import tqdm

import train_sft
from nanocausal import data
from nanocausal.losses import dpo_loss, kto_loss
from nanocausal.tokenizer import Tokenizer
from nanocausal.training import autocast, token_logprobs

# -----------------------------------------------------------------------------
# Arguments


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=train_sft.HelpFormatter)
    g = parser.add_argument_group("preference optimisation")
    g.add_argument("--algo", choices=["dpo", "kto"], default="dpo", help="dpo: pairs (prompt, chosen, rejected); kto: (prompt, completion, label)")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the implicit KL penalty (DPO/KTO beta)")
    g.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO loss: the paper's sigmoid, or IPO")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="DPO: probability that a preference label is flipped (cDPO)")
    g.add_argument("--desirable-weight", type=float, default=1.0, help="KTO: lambda_D, weight of desirable examples")
    g.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO: lambda_U, weight of undesirable examples")
    g.add_argument("--ref-model", default=None, help="reference model (default: --model, the starting point)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="score every example with the reference once, before training, then free it (saves memory and time)")
    train_sft.add_training_arguments(parser, out_dir=None)  # --out-dir defaults to out/<algo>
    parser.set_defaults(lr=5e-7)
    return parser


# -----------------------------------------------------------------------------
# Sequence log-probs and the reference


def sequence_logps(model, input_ids, attention_mask, completion_mask, device):
    """log pi(completion | prompt) per row, (B,): token log-probs summed over the completion."""
    with autocast(device):
        return token_logprobs(model, input_ids, attention_mask, completion_mask).sum(-1)


class Reference:
    """The reference's summed log-probs for a micro-batch: from the frozen model, or looked up in
    the table precompute() filled (one row per example: [chosen, rejected] for DPO, [completion,
    KL pair] for KTO). Either way no gradient flows into them."""

    def __init__(self, model, device):
        self.model, self.device, self.table = model, device, None
        model.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def logps(self, batch, kl=False):
        prefix = "kl_" if kl else ""
        if self.table is not None:  # rows of batch are examples batch["indices"] (DPO: chosen, then rejected)
            table = self.table[batch["indices"]]
            values = table[:, 1] if kl else table[:, 0] if "desirable" in batch else table.T.reshape(-1)
            return values.to(self.device)
        return sequence_logps(self.model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                              batch[prefix + "completion_mask"], self.device)

    @torch.no_grad()
    def precompute(self, rows, collate, pad_id, batch_size):
        table = torch.zeros(len(rows), 2)
        for start in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
            indices = list(range(start, min(start + batch_size, len(rows))))
            batch = data.to_device(collate([rows[i] for i in indices], pad_id), self.device)
            first = self.logps(batch).float().cpu()
            if "desirable" in batch:  # KTO: the example and its KL pair
                table[indices, 0], table[indices, 1] = first, self.logps(batch, kl=True).float().cpu()
            else:  # DPO: chosen rows then rejected rows
                table[indices, 0], table[indices, 1] = first[:len(indices)], first[len(indices):]
        self.table, self.model = table, None  # the reference model is no longer needed


# -----------------------------------------------------------------------------
# The steps


def dpo_step(policy, reference, batches, args):
    num_pairs = sum(len(b["indices"]) for b in batches)
    policy_logps, ref_logps, lengths = [], [], []  # each (2, n) per micro-batch: row 0 chosen, row 1 rejected
    for batch in batches:
        n = len(batch["indices"])
        logps = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], args.device)
        ref = reference.logps(batch)
        length = batch["completion_mask"].sum(-1)  # IPO averages the log-ratios per token
        loss, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=args.beta, label_smoothing=args.label_smoothing,
                           loss_type=args.loss_type, chosen_lengths=length[:n], rejected_lengths=length[n:])
        (loss * n / num_pairs).backward()
        policy_logps.append(logps.detach().view(2, n))
        ref_logps.append(ref.view(2, n))
        lengths.append(length.view(2, n))
    # The step's metrics (and loss) over all its pairs at once: exact whatever the micro-batching.
    policy_logps, ref_logps, lengths = torch.cat(policy_logps, 1), torch.cat(ref_logps, 1), torch.cat(lengths, 1)
    loss, metrics = dpo_loss(policy_logps[0], policy_logps[1], ref_logps[0], ref_logps[1], beta=args.beta,
                             label_smoothing=args.label_smoothing, loss_type=args.loss_type,
                             chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    return {"loss": loss, **metrics}


def kto_step(policy, reference, batches, args):
    num_examples = sum(len(b["indices"]) for b in batches)
    # The reference point z0 uses the KL pairs of the whole step, so every micro-batch sees the same z0.
    with torch.no_grad():
        kl_logps = torch.cat([sequence_logps(policy, b["kl_input_ids"], b["kl_attention_mask"], b["kl_completion_mask"],
                                             args.device) for b in batches])
        ref_kl_logps = torch.cat([reference.logps(b, kl=True) for b in batches])
    policy_logps, ref_logps = [], []
    for batch in batches:
        logps = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], args.device)
        ref = reference.logps(batch)
        loss, _ = kto_loss(logps, ref, kl_logps, ref_kl_logps, batch["desirable"], beta=args.beta,
                           desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight)
        (loss * len(batch["indices"]) / num_examples).backward()
        policy_logps.append(logps.detach())
        ref_logps.append(ref)
    desirable = torch.cat([b["desirable"] for b in batches])
    loss, metrics = kto_loss(torch.cat(policy_logps), torch.cat(ref_logps), kl_logps, ref_kl_logps, desirable,
                             beta=args.beta, desirable_weight=args.desirable_weight,
                             undesirable_weight=args.undesirable_weight)
    return {"loss": loss, **metrics}


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out_dir = args.out_dir or f"out/{args.algo}"
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(args.model)
    policy = train_sft.load_model(args, os.path.join(args.out_dir, "checkpoint") if args.resume else None)
    reference = Reference(train_sft.load_model(args, args.ref_model), args.device)
    max_length = min(args.max_length, policy.config.max_position_embeddings)
    rows = train_sft.load_rows(args, tokenizer, args.algo, max_length)
    collate = data.COLLATE[args.algo]
    if args.precompute_ref:
        reference.precompute(rows, collate, tokenizer.pad_token_id, args.batch_size)
    print(f"{len(rows)} {args.algo.upper()} examples; reference "
          f"{'precomputed' if args.precompute_ref else 'scored each step'}")
    step = dpo_step if args.algo == "dpo" else kto_step
    step_fn = lambda batches: step(policy, reference, batches, args)
    return train_sft.train(args, policy, tokenizer, rows, collate, step_fn)


if __name__ == "__main__":
    main()
