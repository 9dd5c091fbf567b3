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
resumed run equals an uninterrupted one (tests/test_train_offline.py, tests/test_train_rl.py),
also after kill -9 (checkpoint.save_checkpoint is crash-safe: tests/test_crash_safety.py).
A non-finite gradient skips its update; MAX_BAD_STEPS of them in a row stop the run, and no
checkpoint is written after a skipped update. With LoRA (--lora-rank) the same loop trains the
adapters only (start_run adds them; make_optimizer sees only trainable parameters).
"""

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from nanocausal import caugym, checkpoint, data, distributed, evaluation, lora, tracking


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
    activation_checkpointing: bool | None = None  # None: on for CUDA (memory is what runs out there), off on CPU
    cpu_offload: bool = False  # under torchrun: FSDP keeps the parameter shards and the optimiser on the CPU
    # LoRA (nanocausal/lora): rank 0 is full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple = lora.TARGETS
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
    report_to: str = "none"  # also send the metrics to wandb, trackio or tensorboard (comma-separated)
    run_name: str | None = None  # the run's name there (default: out_dir's folder name)
    project: str = "nanocausal"  # wandb / trackio project
    save_every: int = 500
    keep: int = 1  # checkpoints kept: out_dir/checkpoint and the keep - 1 before it (checkpoint-STEP)
    resume: bool = False  # continue from out_dir/checkpoint (from step 0 when there is none yet)
    overwrite: bool = False  # start again in an out_dir that already holds a run
    allow_changed_args: bool = False  # resume with settings that change the run's meaning

    def __post_init__(self):  # settings that contradict each other: refused before anything loads
        if self.activation_checkpointing is None:
            self.activation_checkpointing = str(self.device).startswith("cuda")
        if self.lora_rank <= 0 and (self.lora_alpha, self.lora_dropout, tuple(self.lora_targets)) != \
                (TrainConfig.lora_alpha, TrainConfig.lora_dropout, TrainConfig.lora_targets):
            raise ValueError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank > 0")


MAX_BAD_STEPS = 3  # non-finite steps in a row before the loop gives up

# Settings a resumed run may change without changing what it computes (the rest must match).
RESUMABLE_CHANGES = {"steps", "device", "cpu_offload", "report_to", "run_name", "project", "activation_checkpointing", "log_every", "save_every", "keep", "resume",
                     "overwrite", "allow_changed_args", "show_completions", "precompute_ref", "micro_batch_size", "micro_batch_tokens",
                     "logits_chunk_size", "eval_every", "eval_data", "eval_problems", "eval_samples", "eval_batch_size",
                     "eval_max_new_tokens", "eval_temperature", "eval_top_p"}


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


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov and Hutter, 2019) whose moments are float32 whatever the weights' dtype:

        m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2          t <- t + 1
        p <- p - lr * wd * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    torch.optim.AdamW keeps m and v in the parameter's dtype. For bf16 weights (--dtype bfloat16)
    that is an 8-bit mantissa: v moves by (1 - b2) g^2 = 5 % of g^2 per step, an increment that
    rounds away once v is a few times larger, so the step size drifts. Here m and v are float32
    (8 bytes per parameter, as with float32 weights) and the update is computed in float32 and
    rounded into the weight once. Used for non-float32 weights only; float32 ones get torch's."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                g, m, v = p.grad.float(), state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_() + group["eps"])
                weight = p.float().mul_(1 - group["lr"] * group["weight_decay"]).sub_(update, alpha=group["lr"])
                p.copy_(weight)


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), extra_groups=()):
    """AdamW; weight decay on matrices only (not on norms, biases), as nanoGPT does. extra_groups
    are more parameter groups with their own lr (PPO's value head). Each group remembers its peak
    lr as "peak_lr", which the loop's schedule scales. Non-float32 weights get float32 moments
    (AdamW above)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, *extra_groups]
    every = [p for group in groups for p in group["params"]]
    if all(p.dtype == torch.float32 for p in every):
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=all(p.is_cuda for p in every) or None)
    else:
        optimizer = AdamW(groups, lr=lr, betas=betas)
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
    gradients; returns the norm before clipping. A non-finite norm (a NaN or inf gradient
    anywhere) skips the update: one bad batch must not poison every weight (the loop counts these
    and stops after a few in a row)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # (under FSDP the gradients are DTensor shards and the norm is the global one)
    grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def autocast(device):
    """bf16 autocast on CUDA (weights stay in their dtype); nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seconds_since(started, device):
    """Seconds since `started` (time.time()), once the GPU has finished what was queued: honest
    times (the .item() of the log would sync anyway)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.time() - started


def torch_dtype(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def start_run(config: TrainConfig):
    """Get out_dir ready and load the model the run starts from (out_dir/checkpoint when resuming,
    else config.model). A save that a crash interrupted is completed or undone first; a new run
    into an out_dir that already holds one needs --overwrite (or --resume), so nothing is lost.
    Under torchrun this joins the process group (config.device becomes this rank's GPU), rank 0
    alone touches out_dir, and the model comes back sharded (distributed.shard)."""
    config.device = distributed.setup(config.device)
    ckpt_dir = checkpoint_dir(config)
    if distributed.is_main():
        prepare_out_dir(config, ckpt_dir)
    distributed.barrier()
    config.resume = config.resume and os.path.isdir(ckpt_dir)
    source = ckpt_dir if config.resume else config.model
    model = checkpoint.load_model(source, dtype=torch_dtype(config.dtype), device=config.device)
    if config.lora_rank > 0 and not lora.is_lora_model(model):  # a resumed LoRA run loads its adapters
        model.lora_base = os.path.abspath(config.model) if os.path.isdir(config.model) else config.model
        lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    if distributed.world_size() > 1:
        distributed.shard(model, config.device, config.cpu_offload)
    return model


def prepare_out_dir(config: TrainConfig, ckpt_dir):
    """Rank 0's part of start_run: finish an interrupted save, refuse or clear an earlier run."""
    checkpoint.recover(ckpt_dir)
    has_run = os.path.isdir(ckpt_dir) or os.path.isfile(os.path.join(config.out_dir, "metrics.jsonl"))
    if config.resume and not os.path.isdir(ckpt_dir):
        print(f"--resume: no checkpoint in {config.out_dir} yet, starting from step 0")
        config.resume = False
    elif has_run and not config.resume:
        if not config.overwrite:
            raise ValueError(f"{config.out_dir} already holds a run (checkpoint/ or metrics.jsonl): pass --resume to "
                             f"continue it or --overwrite to start again")
        for name in os.listdir(config.out_dir):
            if name == "checkpoint" or name.startswith("checkpoint-") or name == "metrics.jsonl":
                path = os.path.join(config.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def changed_settings(saved: dict, config: TrainConfig):
    """The settings of `config` that differ from the saved run's and change what it computes."""
    current = asdict(config)
    return {k: (saved[k], current[k]) for k in current
            if k in saved and k not in RESUMABLE_CHANGES and _plain(saved[k]) != _plain(current[k])}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def checkpoint_dir(config: TrainConfig):
    return os.path.join(config.out_dir, "checkpoint")


# -----------------------------------------------------------------------------
# Logging and Ctrl-C


class MetricsLog:
    """Append one JSON object per row to a .jsonl file (flushed, so a crash loses nothing) and keep
    the rows in memory (`rows`) for the caller."""

    def __init__(self, path, resume=False):
        self.file = None  # path None: keep the rows, write nothing (the ranks other than 0)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a" if resume else "w")
        self.start = time.time()
        self.rows = []

    def log(self, **metrics):
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["time"] = round(time.time() - self.start, 3)
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self.rows.append(row)
        return row

    def close(self):
        if self.file is not None:
            self.file.close()


def keep_metrics_until(path, step):
    """On resume, drop the log lines of steps after the checkpoint (they will be run again)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # the last line of a killed run, cut mid-write
    with open(path, "w") as f:
        f.writelines(kept)


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step (it then writes a checkpoint);
    a second one interrupts at once. Stopping between steps, never inside one, is what makes the
    checkpoint consistent: weights, optimiser and data position all belong to the same step."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        # torchrun answers a Ctrl-C by sending its workers SIGTERM (then SIGKILL 30 s later): under
        # it SIGTERM also asks for a checkpoint (agreed(): every rank stops at the same step)
        self.previous_term = signal.signal(signal.SIGTERM, self._handle) if distributed.world_size() > 1 else None
        return self

    def agreed(self):
        """Whether any rank was asked to stop (under torchrun all of them then stop at the same step)."""
        return bool(distributed.all_max(int(self.requested)))

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        if self.previous_term is not None:
            signal.signal(signal.SIGTERM, self.previous_term)


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
    Under torchrun every rank runs this loop; rank 0 alone prints, logs and writes the Hugging Face
    folder (gathered from the shards), every rank saves its optimiser shard, each row carries
    world_size.
    """
    loop_started = time.time()
    ckpt_dir = checkpoint_dir(config)
    metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
    step = 0
    main, ranks = distributed.is_main(), distributed.world_size()
    if config.resume:
        state = checkpoint.load_trainer_state(ckpt_dir, optimizer if ranks == 1 else None)
        if ranks > 1 or state.get("world_size", 1) > 1:
            distributed.load_shards(ckpt_dir, state.get("world_size", 1), model, extra_modules, optimizer)
        changed = changed_settings(state.get("config", {}), config)
        if changed and not config.allow_changed_args:
            raise ValueError(f"--resume with other settings than the run in {config.out_dir}: " + ", ".join(
                f"{k} {saved!r} -> {now!r}" for k, (saved, now) in changed.items()) + " (pass --allow-changed-args "
                "to resume anyway)")
        data_stream.load_state_dict(state["data"])
        step = state["step"]
        if main:
            keep_metrics_until(metrics_path, step)
            print(f"resumed from {ckpt_dir} at step {step}")
    log = MetricsLog(metrics_path if main else None, resume=config.resume)
    tracker = tracking.start(config.report_to if main else "none", config.run_name, config.project, config.out_dir,
                             asdict(config))
    problems = None
    if config.eval_every > 0 and tokenizer is not None:
        problems = data.eval_problems(config.eval_data, n=config.eval_problems, seed=config.seed,
                                      tasks=config.tasks, variant=config.variant, nodes=config.nodes)
    model.train()
    model.gradient_checkpointing = config.activation_checkpointing

    progress = tqdm(total=config.steps, initial=step, desc=desc, dynamic_ncols=True, disable=not main)
    say = progress.write if main else (lambda text: None)

    def evaluate_and_log():
        scores, records = held_out_scores(model, tokenizer, problems, config, say)
        tracker.log(log.log(step=step, world_size=ranks, **scores), step)
        tracker.log_completions(step, records)
        say(f"step {step} eval " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def save():
        for module in [model, *(extra_modules or {}).values()]:
            for name, p in module.named_parameters():
                if not torch.isfinite(p).all():  # never overwrite the last good checkpoint with a broken one
                    raise ValueError(f"step {step}: tensor {name} holds NaN or inf; not saved (the last good "
                                     f"checkpoint is in {ckpt_dir})")
        state = {"step": step, "data": data_stream.state_dict(), "config": asdict(config), "world_size": ranks}
        if ranks == 1:
            checkpoint.save_checkpoint(ckpt_dir, model, config.model, optimizer, state, extra_modules, keep=config.keep)
        else:
            distributed.save_checkpoint(ckpt_dir, model, config.model, optimizer, state, extra_modules, config.keep)

    if problems and step == 0:
        evaluate_and_log()  # the starting point of the learning curve
    train_seconds, bad_steps = 0.0, 0
    try:
        with StopOnCtrlC() as interrupt:
            while step < config.steps:
                factor = lr_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                started = time.time()
                metrics = step_fn(step)
                step_seconds = seconds_since(started, config.device)
                train_seconds += step_seconds
                step += 1
                tokens = metrics.pop("tokens", None)
                row = log.log(step=step, world_size=ranks, lr=optimizer.param_groups[0]["lr"], **metrics,
                              step_s=round(step_seconds, 3),
                              **({"tokens_per_s": round(tokens / step_seconds, 1)} if tokens else {}))
                tracker.log(row, step)
                progress.update(1)
                if step % config.log_every == 0 or step == 1:
                    say(format_row(row))
                # -- finiteness guard: optimizer_step skipped the update of a non-finite gradient; a few
                # such steps in a row mean the run has diverged (a learning rate far too high, say)
                broken = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])]
                bad_steps = bad_steps + 1 if broken else 0
                if broken:
                    say(f"step {step}: {' and '.join(broken)} not finite, update skipped")
                if bad_steps == MAX_BAD_STEPS:
                    raise ValueError(f"step {step}: {broken[0]} was not finite for {MAX_BAD_STEPS} steps in a row "
                                     f"(learning rate too high?); stopped, the last good checkpoint is in {ckpt_dir}")
                if problems and (step % config.eval_every == 0 or step == config.steps):
                    evaluate_and_log()
                stop = interrupt.agreed()
                if (step % config.save_every == 0 or step == config.steps or stop) and not bad_steps:
                    save()  # (never after a skipped update: the checkpoint stays at the last good step)
                if stop:
                    say(f"stopped at step {step}; checkpoint in {ckpt_dir}; rerun with --resume to continue")
                    break
    finally:  # also when the finiteness guard stops the run: logs and trackers are closed
        progress.close()
        log.close()
        tracker.finish()
    model.eval()
    return TrainResult(model=model, history=log.rows, steps=step, train_seconds=train_seconds,
                       wall_seconds=time.time() - loop_started)


@torch.no_grad()
def held_out_scores(model, tokenizer, problems, config: TrainConfig, write=print):
    """Official CauGym accuracy on the held-out problems, through nanocausal.evaluation (the
    sampler, the evaluation flags' sampling settings, the official rule):
    ({"eval_acc": overall, "eval_acc_ATE": ..., ...}, the scored records; with eval_samples = n > 1
    also eval_pass@n and eval_maj@n, eval_acc being pass@1); prints config.show_completions replies."""
    was_training = model.training
    model.eval()
    ranks = distributed.world_size()
    # under torchrun: each rank answers every N-th problem with a full copy of the weights
    generator = model if ranks == 1 else distributed.gathered_copy(
        model, on_every_rank=True, device=config.device,
        dtype=torch.bfloat16 if str(config.device).startswith("cuda") else None)
    with autocast(config.device):
        records = evaluation.evaluate(generator, tokenizer, problems, num_samples=config.eval_samples,
                                      temperature=config.eval_temperature, top_p=config.eval_top_p,
                                      max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size,
                                      seed=config.seed, progress=False, rank=distributed.rank(), world_size=ranks)
    del generator
    records = sorted((r for part in distributed.all_objects(records) for r in part), key=lambda r: (r["index"], r["sample"]))
    model.train(was_training)
    for record in records[:config.show_completions]:
        write(f"--- {record['type']} {record['variant']}, gold {record['answer']}, "
              f"{'correct' if record['correct'] else 'wrong'}:\n{record['response'][-600:]}")
    scores = {("eval_acc" if group == "overall" else f"eval_acc_{group}"): value
              for group, value in evaluation.accuracy(records).items()}
    if config.eval_samples > 1 and config.eval_temperature > 0:  # does RL sharpen pass@1 or widen coverage?
        overall = evaluation.pass_and_majority(records, config.eval_samples)["overall"]
        scores.update({f"eval_{name}": value for name, value in overall.items() if name != "pass@1"})
    return scores, records
