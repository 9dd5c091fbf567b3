"""
Supervised fine-tuning (SFT) on causal-reasoning problems: cross-entropy on the completion tokens
only, the prompt being the official CauGym user message rendered with the model's chat template.

One GPU (bf16 autocast, problems generated on the fly by nanocausal.scm):

    python train_sft.py --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 8 \\
        --grad-accum 4 --steps 2000 --lr 1e-5 --activation-checkpointing --out-dir out/sft

Laptop (CPU, a 135M model; each micro-batch of 2 examples, about 900 tokens, takes seconds):

    python train_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --num-train 512 --batch-size 2 \\
        --grad-accum 2 --steps 20 --lr 5e-5 --eval-every 10 --eval-problems 8 --eval-max-new-tokens 256 \\
        --out-dir out/sft-laptop

From a file instead: --data data/sft.jsonl (fields prompt, completion; or a CauGym file).
Interrupt with Ctrl-C: the script writes a checkpoint first; rerun the same command with --resume
to continue exactly where it stopped. The result, out-dir/checkpoint, is a Hugging Face folder.

What one optimiser step does (the loop below, in labelled blocks as nanoGPT's train.py):
  1. take batch_size * grad_accum examples from a seeded, resumable order (data.Batches);
  2. count the completion tokens of the whole step, N, then for each micro-batch compute the
     completion log-probs (training.token_logprobs: the output head only on completion positions,
     chunked) and backward sft_loss(logprobs, mask, num_target_tokens=N); the sum of the
     micro-batch losses is the mean loss of the whole step, so accumulation equals one big batch;
  3. clip the gradient norm, set the warmup + cosine learning rate, AdamW step.
Not implemented: packing several examples into one row, multi-GPU.
train_pref.py (DPO, KTO) reuses this file's arguments, evaluation and loop (`train`).
"""

import argparse
import math
import os
import signal
import time

import torch
from tqdm import tqdm

from nanocausal import data, scm
from nanocausal.losses import sft_loss
from nanocausal.model import Transformer
from nanocausal.tokenizer import Tokenizer
from nanocausal.training import (MetricsLog, autocast, cosine_lr, default_device, load_trainer_state,
                                 make_optimizer, save_checkpoint, token_logprobs)

# -----------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help prints the docstring as written and each flag's default."""


def add_eval_args(parser, every, temperature, top_p):
    """The periodic-evaluation flags, shared by train_sft.py, train_pref.py and train_rl.py."""
    g = parser.add_argument_group("evaluation (official CauGym scoring on held-out problems, through the sampler)")
    g.add_argument("--eval-every", type=int, default=every, help="evaluate every this many steps (0: never)")
    g.add_argument("--eval-data", default=None, help="CauGym/rl file to evaluate on; default: held-out generated problems")
    g.add_argument("--eval-problems", type=int, default=64, help="number of held-out problems")
    g.add_argument("--eval-samples", type=int, default=1, help="samples per problem (official: 5)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="problems sampled together")
    g.add_argument("--eval-max-new-tokens", type=int, default=1024, help="generation budget per sample")
    g.add_argument("--eval-temperature", type=float, default=temperature, help="sampling temperature, 0 = greedy (official: 0.6)")
    g.add_argument("--eval-top-p", type=float, default=top_p, help="nucleus sampling threshold (official: 0.95)")
    return g


def add_training_arguments(parser, out_dir):
    """The flags every offline trainer shares (train_pref.py adds its own)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or local Hugging Face folder to start from")
    g.add_argument("--data", default=None, help="JSONL with TRL fields, or a CauGym .json/.jsonl; default: generate with nanocausal.scm")
    g.add_argument("--num-train", type=int, default=20000, help="number of problems to generate when --data is not given")
    g.add_argument("--tasks", default=",".join(scm.TASKS), help="comma-separated causal tasks to generate (ATE,CDE,ETT,NDE,NIE,PN,PS)")
    g.add_argument("--variant", default="base", choices=scm.VARIANTS, help="problem variant to generate")
    g.add_argument("--nodes", type=int, default=None, help="graph size of generated problems (default: the generator's own range)")
    g.add_argument("--max-length", type=int, default=2048, help="context length; a longer example is an error naming its file and line")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="number of optimiser steps")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (one forward/backward)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (effective batch = batch-size * grad-accum)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (on matrices only)")
    g.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this value (0: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data, its order and the model's randomness")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype; float32 weights + bf16 autocast on CUDA is the standard mixed precision")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward to save memory")
    add_eval_args(parser, every=200, temperature=0.6, top_p=0.95)
    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=out_dir, help="writes checkpoint/ (a Hugging Face folder) and metrics.jsonl here")
    g.add_argument("--save-every", type=int, default=500, help="write a checkpoint every this many steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10, help="print a progress line every this many steps")
    g.add_argument("--resume", action="store_true", help="continue exactly from out-dir/checkpoint (weights, optimiser, data position, RNG)")
    return parser


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    return add_training_arguments(parser, out_dir="out/sft")


# -----------------------------------------------------------------------------
# Data


def load_rows(args, tokenizer, kind, max_length):
    """The training examples of `kind`, tokenised: from --data, or generated from --seed."""
    if args.data:
        examples = data.load_examples(args.data, kind)
    else:
        examples = data.generated_examples(kind, args.num_train, seed=args.seed, tasks=args.tasks.split(","),
                                           variant=args.variant, nodes=args.nodes)
    return data.tokenize(examples, tokenizer, kind, max_length)


def micro_batches(rows, indices, collate, pad_id, batch_size, device):
    """The step's examples, cut into micro-batches of batch_size, collated and on the device."""
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = data.to_device(collate([rows[i] for i in chunk], pad_id), device)
        batch["indices"] = torch.tensor(chunk)
        out.append(batch)
    return out


# -----------------------------------------------------------------------------
# The step


def sft_step(model, batches, device):
    """Forward and backward every micro-batch of one optimiser step; returns the step's metrics.
    Each micro-batch's loss is divided by the step's token count N (not its own), so the summed
    gradient is that of the whole step's mean loss, whatever the split."""
    num_target_tokens = sum(int(b["completion_mask"][:, 1:].sum()) for b in batches)
    total_loss = 0.0
    for batch in batches:
        with autocast(device):
            logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        loss, _ = sft_loss(logprobs, batch["completion_mask"], num_target_tokens=num_target_tokens)
        loss.backward()
        total_loss += loss.detach()
    return {"loss": total_loss, "num_tokens": num_target_tokens}


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tokenizer, problems, args):
    """Official CauGym accuracy on held-out problems, through eval.py (the sampler, the official
    sampling settings unless overridden, rewards.is_correct): {"eval_acc": ..., "eval_acc_ATE": ...}."""
    import eval as caugym_eval  # eval.py at the repository root

    was_training = model.training
    model.eval()
    with autocast(args.device):
        records = caugym_eval.evaluate(model, tokenizer, problems, num_samples=args.eval_samples,
                                       temperature=args.eval_temperature, top_p=args.eval_top_p,
                                       max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size,
                                       seed=args.seed, progress=False)
    model.train(was_training)
    return {("eval_acc" if group == "overall" else f"eval_acc_{group}"): value
            for group, value in caugym_eval.accuracy(records).items()}


# -----------------------------------------------------------------------------
# Checkpoints and Ctrl-C


class CheckpointOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (it then writes a checkpoint);
    a second one interrupts at once. Stopping between steps, never inside one, is what makes the
    checkpoint consistent: weights, optimiser and data position all belong to the same step."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def keep_metrics_until(path, step):
    """On resume, drop the log lines of steps after the checkpoint (they will be run again)."""
    import json
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


# -----------------------------------------------------------------------------
# The loop (shared with train_pref.py)


def resume(checkpoint_dir, metrics_path, optimizer, data_stream, key):
    """Continue a run from checkpoint_dir: the optimiser and RNG states, the position of
    data_stream (saved under `key` of the trainer state) and metrics.jsonl cut back to the saved
    step. Returns that step."""
    state = load_trainer_state(checkpoint_dir, optimizer)
    data_stream.load_state_dict(state[key])
    keep_metrics_until(metrics_path, state["step"])
    print(f"resumed from {checkpoint_dir} at step {state['step']}")
    return state["step"]


def eval_problems(args):
    """The held-out problems scored every --eval-every steps (None when that is off)."""
    if args.eval_every <= 0:
        return None
    return data.eval_problems(args.eval_data, n=args.eval_problems, seed=args.seed, tasks=args.tasks.split(","),
                              variant=args.variant, nodes=args.nodes)


def train(args, model, tokenizer, rows, collate, step_fn, trainer_state=None):
    """Run args.steps optimiser steps of step_fn(batches) -> metrics on model; log, evaluate, save."""
    device = args.device
    checkpoint_dir = os.path.join(args.out_dir, "checkpoint")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    model.train()
    model.gradient_checkpointing = args.activation_checkpointing
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    order = data.Batches(len(rows), args.batch_size * args.grad_accum, seed=args.seed)
    step = resume(checkpoint_dir, metrics_path, optimizer, order, "data") if args.resume else 0
    log = MetricsLog(metrics_path, resume=args.resume)
    problems = eval_problems(args)

    def save():
        state = {"step": step, "data": order.state_dict(), "args": vars(args), **(trainer_state or {})}
        save_checkpoint(checkpoint_dir, model, args.model, optimizer, state)

    progress = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    with CheckpointOnInterrupt() as interrupt:
        while step < args.steps:
            # -- learning rate: linear warmup then cosine decay
            lr = cosine_lr(step, args.steps, args.lr, args.warmup_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # -- forward/backward every micro-batch of the step, then clip and update
            started = time.time()
            batches = micro_batches(rows, order.next(), collate, tokenizer.pad_token_id, args.batch_size, device)
            metrics = step_fn(batches)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # -- log (.item() syncs with the GPU: once per step, after the update)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.time() - started
            tokens = sum(int(b["attention_mask"].sum()) + int(b.get("kl_attention_mask", torch.zeros(1)).sum()) for b in batches)
            row = log.log(step=step, lr=lr, grad_norm=grad_norm, tokens_per_s=round(tokens / elapsed, 1),
                          epoch=order.epoch, **metrics)
            progress.update(1)
            if step % args.log_every == 0 or step == 1:
                progress.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            # -- evaluate, save
            if problems and (step % args.eval_every == 0 or step == args.steps):
                scores = evaluate(model, tokenizer, problems, args)
                log.log(step=step, **scores)
                progress.write(f"step {step} eval " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            if step % args.save_every == 0 or step == args.steps or interrupt.requested:
                save()
            if interrupt.requested:
                progress.write(f"stopped at step {step}; checkpoint in {checkpoint_dir}; rerun with --resume to continue")
                break
    progress.close()
    return model


# -----------------------------------------------------------------------------
# Main


def load_model(args, path=None):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return Transformer.from_pretrained(path or args.model, dtype=dtype, device=args.device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = load_model(args, os.path.join(args.out_dir, "checkpoint") if args.resume else None)
    max_length = min(args.max_length, model.config.max_position_embeddings)
    rows = load_rows(args, tokenizer, "sft", max_length)
    print(f"{len(rows)} SFT examples, {sum(len(r['ids']) for r in rows) / len(rows):.0f} tokens on average")
    step_fn = lambda batches: sft_step(model, batches, args.device)
    return train(args, model, tokenizer, rows, data.collate_sft, step_fn)


if __name__ == "__main__":
    main()
