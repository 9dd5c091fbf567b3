"""The one training loop, used by SFT, DPO, KTO, PPO and GRPO alike.

Each trainer (sft.py, preference.py, rl.py) builds its model, optimiser and data, then hands this
loop a *step function*: step_fn(step) -> metrics runs the forward/backward passes of one step and
calls `optimizer_step` (once for SFT/DPO/KTO, once per mini-batch for PPO/GRPO). The loop owns
everything else, the same way for all five:

    for step in range(start, config.steps):
        set every group's lr = its peak lr * schedule(step)     (linear warmup, then cosine)
        metrics = step_fn(step)                                 (forward, backward, clip, AdamW)
        log the metrics to metrics.jsonl and the progress bar   (every --log-every steps printed)
        every --eval-every steps: official CauGym accuracy on held-out problems
        every --save-every steps, at the end and on Ctrl-C: a checkpoint that resumes exactly

Resuming (--resume) restores the optimiser, the RNG states, the data stream's position and the
step from out_dir/checkpoint, and cuts metrics.jsonl back to that step, so an interrupted and
resumed run equals an uninterrupted one (tests/test_train_offline.py, tests/test_train_rl.py).
"""

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from nanocausal import caugym, checkpoint, data, evaluation


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TrainConfig:
    """What the loop reads, shared by every trainer's config (each adds its own fields)."""
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # hub id or local folder to start from
    out_dir: str = "out/run"  # checkpoint/ and metrics.jsonl go here
    # optimisation
    steps: int = 1000
    lr: float = 1e-5  # peak learning rate
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping (0: none)
    seed: int = 0
    # hardware
    device: str = default_device()
    dtype: str = "float32"  # weights; float32 + bf16 autocast on CUDA is the standard mixed precision
    activation_checkpointing: bool = False
    # generated problems (training data, RL prompts and held-out evaluation problems)
    tasks: tuple = caugym.TASKS
    variant: str = "base"  # RL accepts a comma-separated mix
    nodes: str | None = None  # graph sizes: N or LO-HI (default: the generator's)
    # periodic evaluation
    eval_every: int = 200  # 0: never
    eval_data: str | None = None  # a CauGym / rl file; default: held-out generated problems
    eval_problems: int = 64
    eval_samples: int = 1
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 1024
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    show_completions: int = 0  # evaluation completions printed each time
    # output
    log_every: int = 10
    save_every: int = 500
    resume: bool = False


@dataclass
class TrainResult:
    """What a trainer returns: the trained model and how the run went."""
    model: torch.nn.Module
    history: list  # every row written to metrics.jsonl by this process (steps and evaluations)
    steps: int  # the step the run ended at
    train_seconds: float  # time spent in step functions (evaluation and saving excluded)
    wall_seconds: float  # the loop's whole time, evaluation and saving included (loading excluded)


# -----------------------------------------------------------------------------
# Optimiser, schedule, precision


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), extra_groups=()):
    """AdamW; weight decay on matrices only (not on norms, biases), as nanoGPT does. extra_groups
    are more parameter groups with their own lr (PPO's value head). Each group remembers its peak
    lr as "peak_lr", which the loop's schedule scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, *extra_groups]
    fused = all(p.is_cuda for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    return optimizer


def lr_factor(step, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """The schedule as a fraction of the peak lr: linear warmup over warmup_steps, then a cosine
    decay to min_lr_ratio at total_steps (min_lr_ratio = 1: constant after warmup)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer, clip):
    """Clip the gradient norm of every parameter the optimiser holds, take one AdamW step, zero the
    gradients; returns the norm before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def autocast(device):
    """bf16 autocast on CUDA (weights stay in their dtype); nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def torch_dtype(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_start_model(config: TrainConfig):
    """The model a run starts from: out_dir/checkpoint when resuming, else config.model."""
    source = checkpoint_dir(config) if config.resume else config.model
    return checkpoint.load_model(source, dtype=torch_dtype(config.dtype), device=config.device)


def checkpoint_dir(config: TrainConfig):
    return os.path.join(config.out_dir, "checkpoint")


# -----------------------------------------------------------------------------
# Logging and Ctrl-C


class MetricsLog:
    """Append one JSON object per row to a .jsonl file (flushed, so a crash loses nothing) and keep
    the rows in memory (`rows`) for the caller."""

    def __init__(self, path, resume=False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a" if resume else "w")
        self.start = time.time()
        self.rows = []

    def log(self, **metrics):
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["time"] = round(time.time() - self.start, 3)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.rows.append(row)
        return row

    def close(self):
        self.file.close()


def keep_metrics_until(path, step):
    """On resume, drop the log lines of steps after the checkpoint (they will be run again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


class StopOnCtrlC:
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


def format_row(row):
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


# -----------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, model, optimizer, step_fn, data_stream, tokenizer=None, extra_modules=None,
          desc="train"):
    """Run step_fn(step) -> metrics from the current step to config.steps; log, evaluate, save.

    data_stream: the resumable source of the run's examples (data.Batches or rollout.PromptStream):
        its state_dict() is saved with every checkpoint and restored on --resume.
    tokenizer: needed for the periodic evaluation (none: no evaluation) and copied into checkpoints.
    extra_modules: {name: module} saved beside the model (PPO's value head).
    """
    loop_started = time.time()
    ckpt_dir = checkpoint_dir(config)
    metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
    step = 0
    if config.resume:
        state = checkpoint.load_trainer_state(ckpt_dir, optimizer)
        data_stream.load_state_dict(state["data"])
        step = state["step"]
        keep_metrics_until(metrics_path, step)
        print(f"resumed from {ckpt_dir} at step {step}")
    log = MetricsLog(metrics_path, resume=config.resume)
    problems = None
    if config.eval_every > 0 and tokenizer is not None:
        problems = data.eval_problems(config.eval_data, n=config.eval_problems, seed=config.seed,
                                      tasks=config.tasks, variant=config.variant, nodes=config.nodes)
    model.train()
    model.gradient_checkpointing = config.activation_checkpointing

    progress = tqdm(total=config.steps, initial=step, desc=desc, dynamic_ncols=True)

    def evaluate_and_log():
        scores = held_out_scores(model, tokenizer, problems, config, progress.write)
        log.log(step=step, **scores)
        progress.write(f"step {step} eval " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def save():
        state = {"step": step, "data": data_stream.state_dict(), "config": asdict(config)}
        checkpoint.save_checkpoint(ckpt_dir, model, config.model, optimizer, state, extra_modules)

    if problems and step == 0:
        evaluate_and_log()  # the starting point of the learning curve
    train_seconds = 0.0
    with StopOnCtrlC() as interrupt:
        while step < config.steps:
            factor = lr_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            started = time.time()
            metrics = step_fn(step)
            if str(config.device).startswith("cuda"):
                torch.cuda.synchronize()  # honest step times; .item() below would sync anyway
            step_seconds = time.time() - started
            train_seconds += step_seconds
            step += 1
            tokens = metrics.pop("tokens", None)
            row = log.log(step=step, lr=optimizer.param_groups[0]["lr"], **metrics, step_s=round(step_seconds, 3),
                          **({"tokens_per_s": round(tokens / step_seconds, 1)} if tokens else {}))
            progress.update(1)
            if step % config.log_every == 0 or step == 1:
                progress.write(format_row(row))
            if problems and (step % config.eval_every == 0 or step == config.steps):
                evaluate_and_log()
            if step % config.save_every == 0 or step == config.steps or interrupt.requested:
                save()
            if interrupt.requested:
                progress.write(f"stopped at step {step}; checkpoint in {ckpt_dir}; rerun with --resume to continue")
                break
    progress.close()
    log.close()
    model.eval()
    return TrainResult(model=model, history=log.rows, steps=step, train_seconds=train_seconds,
                       wall_seconds=time.time() - loop_started)


@torch.no_grad()
def held_out_scores(model, tokenizer, problems, config: TrainConfig, write=print):
    """Official CauGym accuracy on the held-out problems, through nanocausal.evaluation (the
    sampler, the evaluation flags' sampling settings, the official rule):
    {"eval_acc": overall, "eval_acc_ATE": ..., ...}; prints config.show_completions replies."""
    was_training = model.training
    model.eval()
    with autocast(config.device):
        records = evaluation.evaluate(model, tokenizer, problems, num_samples=config.eval_samples,
                                      temperature=config.eval_temperature, top_p=config.eval_top_p,
                                      max_new_tokens=config.eval_max_new_tokens,
                                      batch_size=config.eval_batch_size, seed=config.seed, progress=False)
    model.train(was_training)
    for record in records[:config.show_completions]:
        write(f"--- {record['type']} {record['variant']}, gold {record['answer']}, "
              f"{'correct' if record['correct'] else 'wrong'}:\n{record['response'][-600:]}")
    return {("eval_acc" if group == "overall" else f"eval_acc_{group}"): value
            for group, value in evaluation.accuracy(records).items()}
