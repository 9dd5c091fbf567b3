"""Supervised fine-tuning: cross-entropy on the completion tokens only (losses.sft_loss), the prompt
being the official CauGym user message rendered with the model's chat template.

What one optimiser step does:
  1. take batch_size * grad_accum examples from a seeded, resumable order (data.Batches);
  2. count the completion tokens of the whole step, N, then for each micro-batch compute the
     completion log-probs (logprobs.token_logprobs: the output head only on completion positions,
     chunked) and backward sft_loss(logprobs, mask, num_target_tokens=N). Each micro-batch's loss
     is divided by the step's N, not its own token count, so the summed gradient is that of the
     whole step's mean loss, whatever the split: accumulation equals one big batch;
  3. clip the gradient norm and take an AdamW step (training.optimizer_step); the loop in
     training.py sets the warmup + cosine learning rate, logs, evaluates and saves.
Under torchrun each rank takes its contiguous share of the step's examples (distributed.share) and
N is all-reduced, so the N-rank gradient is the one-process one (nanocausal/distributed.py).
"""
from dataclasses import dataclass

import torch

from nanocausal import cli, data, distributed, memory_plan, training
from nanocausal.logprobs import token_logprobs
from nanocausal.losses import sft_loss
from nanocausal.tokenizer import Tokenizer
from nanocausal.training import TrainConfig, autocast


@dataclass
class SFTConfig(TrainConfig):
    data: str | None = None  # JSONL with TRL fields, or a CauGym file; None: generate num_train problems
    num_train: int = 20000
    max_length: int = 2048  # a longer example is an error naming its file and line
    batch_size: int = 8  # examples per micro-batch (one forward/backward)
    grad_accum: int = 1  # micro-batches per optimiser step
    micro_batch_tokens: int = 0  # also at most this many padded tokens per micro-batch; 0: no limit
    out_dir: str = "out/sft"

    def __post_init__(self):  # a library user's config is checked as the flags are: one line naming the setting
        super().__post_init__()
        cli.check_train_config(self, {})


def load_rows(config: SFTConfig, tokenizer, kind, max_length):
    """The training examples of `kind` (sft, dpo, kto), tokenised: from config.data, or generated
    from config.seed."""
    if config.data:
        examples = data.load_examples(config.data, kind)
    else:
        examples = data.generated_examples(kind, config.num_train, seed=config.seed, tasks=config.tasks,
                                           variant=config.variant, nodes=config.nodes)
    return data.tokenize(examples, tokenizer, kind, max_length)


def sft_backward(model, batches, device):
    """Forward and backward every micro-batch of one optimiser step (this rank's share of it);
    returns the step's metrics."""
    num_target_tokens = distributed.all_sum(sum(int(b["completion_mask"][:, 1:].sum()) for b in batches))
    total_loss = 0.0
    for batch, weight in distributed.pad_to_longest(batches):
        with autocast(device):
            logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        loss, _ = sft_loss(logprobs, batch["completion_mask"], num_target_tokens=num_target_tokens)
        (loss * weight).backward()
        total_loss += loss.detach() * weight
    return {"loss": distributed.all_sum(total_loss), "num_tokens": num_target_tokens}


def offline_step_fn(config: SFTConfig, rows, collate, pad_id, optimizer, backward):
    """The step function of every offline trainer (SFT, DPO, KTO) for training.train, and its
    resumable example order: the step's examples, cut into micro-batches, go through
    backward(batches) -> metrics, then one clipped AdamW step."""
    order = data.Batches(len(rows), config.batch_size * config.grad_accum, seed=config.seed)

    def step_fn(step):
        batches = data.micro_batches(rows, distributed.share(order.next()), collate, pad_id, config.batch_size,
                                     config.device, config.micro_batch_tokens)
        metrics = backward(batches)
        metrics["grad_norm"] = training.optimizer_step(optimizer, config.clip)
        metrics["epoch"] = order.epoch
        metrics["tokens"] = distributed.all_sum(
            sum(int(b["attention_mask"].sum()) for b in batches) +
            sum(int(b["kl_attention_mask"].sum()) for b in batches if "kl_attention_mask" in b))
        return metrics
    return step_fn, order


def train_sft(config: SFTConfig) -> training.TrainResult:
    """Fine-tune config.model on the completions of config.data (or generated problems)."""
    torch.manual_seed(config.seed)
    tokenizer = Tokenizer.from_pretrained(config.model)
    memory_plan.check_fits(config, "sft")
    model = training.start_run(config)
    max_length = min(config.max_length, model.config.max_position_embeddings)
    rows = load_rows(config, tokenizer, "sft", max_length)
    print(f"{len(rows)} SFT examples, {sum(len(r['ids']) for r in rows) / len(rows):.0f} tokens on average")
    optimizer = training.make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    step_fn, order = offline_step_fn(config, rows, data.collate_sft, tokenizer.pad_token_id, optimizer,
                                     lambda batches: sft_backward(model, batches, config.device))
    return training.train(config, model, optimizer, step_fn, order, tokenizer, desc="sft")
