"""The one training loop, used by SFT, DPO, KTO, PPO and GRPO alike.

Each trainer (offline.py, rl.py) builds its model, optimiser and data, then hands this
loop a *step function*: step_fn(step) -> metrics runs the forward/backward passes of one step and
calls `optimizer_step` (once for SFT/DPO/KTO, once per mini-batch for PPO/GRPO). The loop owns
everything else, the same way for all five:

    for step in range(start, config.steps):
        set every group's lr = its peak lr * schedule(step)     (linear warmup, then cosine)
        metrics = step_fn(step)                                 (forward, backward, clip, AdamW)
        log the metrics to metrics.jsonl and the progress bar   (every --log-every steps printed)
        every --eval-every steps: official CauGym accuracy on held-out problems
        every --save-every steps, at the end and on Ctrl-C / SIGTERM: a checkpoint that resumes exactly

Resuming (--resume) restores the optimiser, the RNG states, the data stream's position and the
step from out_dir/checkpoint, and cuts metrics.jsonl back to that step, so an interrupted and
resumed run equals an uninterrupted one, also after kill -9 (README: "Interruptions, crashes and
bad input"; StopOnSignal, diverged; the out-dir's checks and lock: rundir.py).
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

from nanocausal import checkpoint, data, distributed, evaluation, lora, pass_at_k, rundir, tracking
from nanocausal.config import TrainConfig
from nanocausal.optimizer import AdamW


MAX_BAD_STEPS = 3  # non-finite steps in a row before the loop gives up


@dataclass
class TrainResult:
    """What a trainer returns: the trained model and how the run went."""
    model: torch.nn.Module
    history: list  # every row written to metrics.jsonl by this process (steps and evaluations)
    steps: int  # the step the run ended at (each row's step_s: the time in its step function)
    wall_seconds: float  # the loop's whole time, evaluation and saving included (loading excluded)


# -----------------------------------------------------------------------------
# The optimiser, the schedule and precision


def make_optimizer(model, lr, weight_decay=0.0, extra_groups=()):
    """AdamW, betas (0.9, 0.95); weight decay on matrices only (not on norms, biases), as nanoGPT
    does. extra_groups are more parameter groups with their own lr (PPO's value head). Each group
    remembers its peak lr as "peak_lr", which the loop's schedule scales. Non-float32 weights get
    optimizer.AdamW (float32 moments and updates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, *extra_groups]
    every = [p for group in groups for p in group["params"]]
    if all(p.dtype == torch.float32 for p in every):
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=all(p.is_cuda for p in every) or None)
    else:
        optimizer = AdamW(groups, lr=lr)  # its default betas are (0.9, 0.95)
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
    """Clip the gradient norm (the global one under FSDP), take one AdamW step, zero the gradients;
    returns the norm before clipping. A non-finite norm (a NaN or inf gradient anywhere) skips the
    update: one bad batch must not poison every weight (the loop stops after a few in a row)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
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


def start_run(config: TrainConfig):
    """Check the run can start (rundir.check: nothing created or cleared), then load the model it
    starts from (out_dir/checkpoint when resuming, else config.model) and add LoRA's adapters.
    train() claims out_dir only once the trainer has built everything else. Under torchrun this
    joins the process group (config.device becomes this rank's GPU), rank 0 alone touches
    out_dir, and the model comes back sharded (distributed.shard)."""
    config.device = distributed.setup(config.device)
    ckpt_dir = checkpoint_dir(config)
    try:
        if distributed.is_main():
            rundir.check(config, ckpt_dir)  # locks out_dir when it exists: held until train() ends
        distributed.barrier()
        config.resume = config.resume and os.path.isdir(ckpt_dir)
        source = ckpt_dir if config.resume else config.model
        model = checkpoint.load_model(source, getattr(torch, config.dtype), config.device)
    except BaseException:
        rundir.release(config.out_dir)  # refused or unloadable: the out-dir is free again at once
        raise
    if config.lora_rank > 0 and not lora.is_lora_model(model):  # a resumed LoRA run loads its adapters
        model.lora_base = os.path.abspath(config.model) if os.path.isdir(config.model) else config.model
        lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    if distributed.world_size() > 1:
        distributed.shard(model, config.device, config.cpu_offload)
    return model


def checkpoint_dir(config: TrainConfig):
    return os.path.join(config.out_dir, "checkpoint")


# -----------------------------------------------------------------------------
# Logging and Ctrl-C


class MetricsLog:
    """Append one JSON object per row to a .jsonl file (flushed, so a crash loses nothing) and keep
    the rows in memory (`rows`); path None writes nothing (the ranks other than 0)."""

    def __init__(self, path, resume=False):
        self.file = None if path is None else open(path, "a" if resume else "w")  # (claim made out_dir)
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


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (`timeout`, SLURM, Kubernetes, torchrun) asks the loop to stop
    after the current step and write a checkpoint; a second one interrupts at once. Stopping
    between steps, never inside one, keeps the checkpoint consistent: weights, optimiser and data
    position belong to the same step. A SIGTERM then exits with status 143 (128 + 15: a scheduler
    sees an unfinished run), a Ctrl-C with 0."""

    def __enter__(self):
        self.requested = 0  # the signal's number
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def agreed(self):
        """The signal any rank got (SIGTERM over SIGINT), 0 for none: under torchrun every rank
        then stops at the same step."""
        return int(distributed.all_max(self.requested))

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              f"(send it again to abort)")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# -----------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, model, optimizer, step_fn, data_stream, tokenizer, extra_modules=None, desc="train"):
    """Run step_fn(step) -> metrics from the current step to config.steps; log, evaluate, save.

    step_fn's contract: it runs one step's passes and optimiser step(s) and returns {name: number}
        logged as they are, with one exception: "tokens" (optional, the tokens the step ran
        through) is logged as tokens_per_s over the step's wall time.

    data_stream: the resumable source of the run's examples (data.Batches or rollout.PromptStream):
        its state_dict() is saved with every checkpoint and restored on --resume.
    tokenizer: the periodic evaluation's.
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
    if main:
        rundir.claim(config, ckpt_dir)  # released when the loop ends, however it ends
    fingerprints = None
    if config.resume:
        # this run's hyperparameters (peak lr, weight decay, value_lr) win over the restored ones (they
        # differ only under --allow-changed-args); the moments and step counts come from the checkpoint
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        state = checkpoint.load_trainer_state(ckpt_dir, optimizer if ranks == 1 else None)
        if ranks > 1 or state.get("world_size", 1) > 1:
            distributed.load_shards(ckpt_dir, state.get("world_size", 1), model, extra_modules, optimizer)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if not config.allow_changed_args:
            fingerprints = state.get("fingerprints")  # (check_resume found the paths' content unchanged)
        data_stream.load_state_dict(state["data"])
        step = state["step"]
        if main:
            rundir.keep_metrics_until(metrics_path, step)
            print(f"resumed from {ckpt_dir} at step {step}")
    if fingerprints is None and main:
        fingerprints = rundir.path_fingerprints(config)
    log = MetricsLog(metrics_path if main else None, resume=config.resume)
    tracker = tracking.start(config.report_to if main else "none", config.run_name, config.project, config.out_dir,
                             asdict(config))
    problems = None
    if config.eval_every > 0:
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
                    raise ValueError(f"step {step}: tensor {name} holds NaN or inf after the update; not saved, "
                                     + rundir.good_checkpoint(ckpt_dir))
        state = {"step": step, "data": data_stream.state_dict(), "config": asdict(config), "world_size": ranks,
                 "fingerprints": fingerprints or {}}
        write = checkpoint.save_checkpoint if ranks == 1 else distributed.save_checkpoint
        write(ckpt_dir, model, config.model, optimizer, state, extra_modules, keep=config.keep)

    if problems and step == 0:
        evaluate_and_log()  # the starting point of the learning curve
    bad_steps, stop = 0, 0
    try:
        with StopOnSignal() as interrupt:
            while step < config.steps:
                factor = lr_factor(step, config.steps, config.warmup_steps, config.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                started = time.time()
                metrics = step_fn(step)
                step_seconds = seconds_since(started, config.device)
                step += 1
                tokens = metrics.pop("tokens", None)
                row = log.log(step=step, world_size=ranks, lr=optimizer.param_groups[0]["lr"], **metrics,
                              step_s=round(step_seconds, 3),
                              **({"tokens_per_s": round(tokens / step_seconds, 1)} if tokens else {}))
                tracker.log(row, step)
                progress.update(1)
                if step % config.log_every == 0 or step == 1:
                    say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
                # optimizer_step skipped a non-finite update; a few in a row, or one at the end: diverged
                broken = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])]
                bad_steps = bad_steps + 1 if broken else 0
                if broken:
                    say(f"step {step}: {' and '.join(broken)} not finite, update skipped")
                if bad_steps == MAX_BAD_STEPS or (bad_steps and step == config.steps):
                    raise ValueError(diverged(ckpt_dir, step, bad_steps, broken[0], main))
                if problems and (step % config.eval_every == 0 or step == config.steps):
                    evaluate_and_log()
                stop = interrupt.agreed()
                if (step % config.save_every == 0 or step == config.steps or stop) and not bad_steps:
                    save()  # (never after a skipped update: the checkpoint stays at the last good step)
                if stop:
                    say(f"stopped at step {step} ({signal.Signals(stop).name}); "
                        f"{'checkpoint in ' + ckpt_dir if not bad_steps else rundir.good_checkpoint(ckpt_dir)}; "
                        f"rerun with --resume to continue" + ("; exit status 143" if stop == signal.SIGTERM else ""))
                    break
    finally:  # also when the finiteness guard stops the run: logs and trackers are closed, out_dir unlocked
        progress.close()
        log.close()
        tracker.finish()
        rundir.release(config.out_dir)
    if stop == signal.SIGTERM:
        raise SystemExit(128 + signal.SIGTERM)  # after the checkpoint: the scheduler sees an unfinished run
    model.eval()
    return TrainResult(model=model, history=log.rows, steps=step, wall_seconds=time.time() - loop_started)


def diverged(ckpt_dir, step, bad_steps, metric, main):
    """The one-line message of a run stopped for divergence, after setting its bad checkpoint aside.

    Which checkpoint is good? The weights after step k are known good only once step k + 1 has
    computed a finite loss on them (at --lr 1e30 step 1 is finite and leaves weights of ~1e30,
    whose loss at step 2 is NaN). The last bad_steps steps were all non-finite and their updates
    skipped, so they all ran on the weights of step s = step - bad_steps: those are the bad ones.
    A checkpoint of step s is moved aside (rundir.set_aside_diverged); any earlier one is good."""
    bad_step = step - bad_steps
    if main:
        rundir.set_aside_diverged(ckpt_dir, bad_step)
    aside = f" ({os.path.basename(ckpt_dir)}-{bad_step:06d}-diverged holds them)" \
        if os.path.isdir(f"{ckpt_dir}-{bad_step:06d}-diverged") else ""
    return (f"step {step}: {metric} was not finite" + (f" for {bad_steps} steps in a row" if bad_steps > 1 else "")
            + (" at the end of the run" if bad_steps < MAX_BAD_STEPS else "") + ": the run diverged (learning rate too high?); "
            f"the weights of step {bad_step} produced it{aside}; " + rundir.good_checkpoint(ckpt_dir))


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
    by_variant = evaluation.accuracy(records, by="variant")  # in-distribution and held-out sets side by side
    scores.update({f"eval_acc_{v}": a for v, a in by_variant.items() if v != "overall"} if len(by_variant) > 2 else {})
    if config.eval_samples > 1 and config.eval_temperature > 0:  # does RL sharpen pass@1 or widen coverage?
        overall = pass_at_k.pass_and_majority(records, config.eval_samples)["overall"]
        scores.update({f"eval_{name}": value for name, value in overall.items() if name != "pass@1"})
    return scores, records
