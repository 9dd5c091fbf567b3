"""Command-line plumbing shared by the scripts: the flags every trainer has, typed argument
checks, flags -> a config dataclass, and one-line errors.

A script defines its own flags (those of its algorithm), adds the shared groups from here with
the defaults of its config class, parses, and calls `config_from_args(ConfigClass, args)`: every
field of the config is read from the flag of the same name (--grad-accum -> grad_accum).
"""
import argparse
import dataclasses
import math
import os
import sys

import jinja2

from nanocausal import caugym, tracking


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help prints the script's docstring as written and each flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors of one line (the flag and what was expected), like every other error
    of the scripts; --help still prints the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(doc, prog=None):
    return ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)

# -----------------------------------------------------------------------------
# Argument types: a bad value is refused by argparse with the flag's name. Every number must be
# finite (inf or nan in a learning rate or a temperature poisons a run silently), and lie in the
# range its formula allows: a probability in [0, 1], top-p in (0, 1], ...


def positive_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


MAX_SEED = 2**63  # numpy's and torch's generators take any seed in [0, 2**63)


def seed(text):
    value = _int(text)
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number_in(low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """The argparse type of a finite float in the interval from low to high (open at an end when
    low_open / high_open); its `interval` text ("in [0, 1]", ">= 0") is what errors say."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        problem = out_of_range(value, parse)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    parse.bounds = (low, high, low_open, high_open)
    parse.__name__ = "number"
    return parse


def interval_text(number_type):
    """" >= 0", " in (0, 1]", ... ("" when any finite number will do)."""
    low, high, low_open, high_open = number_type.bounds
    if high == math.inf:
        return "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def out_of_range(value, number_type):
    """None when `value` is a finite number within number_type's bounds, else what it must be."""
    low, high, low_open, high_open = number_type.bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < low or value > high or (low_open and value == low) or (high_open and value == high):
        return f"must be a finite number{interval_text(number_type)}"
    return None


finite_float = number_in()
non_negative_float = number_in(0)
positive_float = number_in(0, low_open=True)
probability = number_in(0, 1)  # a share, a ratio, GAE's gamma and lambda, dropout...
top_p = number_in(0, 1, low_open=True)  # nucleus mass: 0 keeps no token at all
below_one = number_in(0, 1, high_open=True)  # dropout: 1 drops everything


def check_numbers(config, bounds):
    """The config-side twin of the flag types: a ValueError naming the setting (as its flag) when
    a field of `config` is not a finite number in its range. bounds: {field: number type}."""
    for name, number_type in bounds.items():
        problem = out_of_range(getattr(config, name), number_type)
        if problem:
            raise ValueError(f"--{name.replace('_', '-')} {problem}, got {getattr(config, name)!r}")


def check_seed(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {value!r}")


def device(text):
    """--device: cpu, cuda, cuda:N or mps. Whether this machine has it is checked when a run starts
    (device_problem), not here: --plan may plan a GPU run on a laptop."""
    problem = device_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def device_name_problem(text):
    """None when `text` names a kind of device nanocausal runs on, else what was expected."""
    import torch
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError):
        kind = None
    return None if kind in ("cpu", "cuda", "mps") else f"expected cpu, cuda, cuda:N or mps, got {text!r}"


def device_problem(text):
    """None when this machine has the device `text`, else why not (one line naming --device)."""
    import torch
    problem = device_name_problem(text)
    if problem:
        return f"--device {problem}"
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {text}: this machine has no CUDA GPU (use --device cpu)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {text}: MPS is not available on this machine"
    return None


# The number fields every trainer's config shares (TrainConfig), with the ranges of their flags.
def train_number_bounds():
    return {"lr": non_negative_float, "min_lr_ratio": probability, "weight_decay": non_negative_float,
            "clip": non_negative_float, "lora_alpha": non_negative_float, "lora_dropout": below_one,
            "eval_temperature": non_negative_float, "eval_top_p": top_p}


def check_train_config(config, bounds):
    """A trainer config's __post_init__ check: its numbers (train_number_bounds() and `bounds`),
    its seed and its device's name; a ValueError naming the setting as its flag."""
    check_numbers(config, {**train_number_bounds(), **bounds})
    check_seed(config.seed)
    problem = device_name_problem(str(config.device))
    if problem:
        raise ValueError(f"--device {problem}")


def report_backends(text):
    """--report-to: checked (names known, packages installed) before any model is loaded."""
    try:
        tracking.check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def task_list(text):
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in caugym.TASKS]
    if not tasks or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(caugym.TASKS)}, got {text}")
    return tasks


def variant_list(text):
    """--variant: one variant, or a comma-separated mix of them."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in caugym.VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"expected one or a comma-separated mix of {','.join(caugym.VARIANTS)}, got {text}")
    return text


def graph_size(text):
    """--nodes of one size N (eval.py's generated sets): an integer the generator can draw, 2..16."""
    value = _int(text)
    if not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be a graph size in 2..16, got {text}")
    return value


def graph_sizes(text):
    """--nodes: N or LO-HI, graph sizes the generator can draw (2..16)."""
    from nanocausal import problems
    try:
        problems.node_range(text, "base")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

# -----------------------------------------------------------------------------
# The flags every trainer shares (defaults from its config class)


def add_model_args(parser, defaults, model_help="hub id or local Hugging Face folder to start from"):
    g = parser.add_argument_group("model and generated problems")
    g.add_argument("--model", default=defaults.model, help=model_help)
    g.add_argument("--tasks", type=task_list, default=defaults.tasks,
                   help="comma-separated causal tasks of generated problems (ATE,CDE,ETT,NDE,NIE,PN,PS)")
    g.add_argument("--variant", type=variant_list, default=defaults.variant,
                   help=f"problem variant of generated problems ({', '.join(caugym.VARIANTS)}; RL: a comma-separated mix)")
    g.add_argument("--nodes", type=graph_sizes, default=defaults.nodes,
                   help="graph sizes of generated problems: N or LO-HI (default: the generator's, 3-5 nodes for base)")
    return g


def add_optimisation_args(parser, defaults):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=defaults.steps, help="number of optimiser steps (RL: rollout batches)")
    g.add_argument("--lr", type=non_negative_float, default=defaults.lr, help="peak learning rate of AdamW")
    g.add_argument("--warmup-steps", type=non_negative_int, default=defaults.warmup_steps,
                   help="linear warmup steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=probability, default=defaults.min_lr_ratio,
                   help="the cosine decays to this fraction of --lr (1: constant)")
    g.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                   help="AdamW weight decay (on matrices only)")
    g.add_argument("--clip", type=non_negative_float, default=defaults.clip,
                   help="clip the gradient norm to this value (0: no clipping)")
    g.add_argument("--seed", type=seed, default=defaults.seed, help="seed of the data, its order, the sampler and the model's randomness")
    return g


def add_hardware_args(parser, defaults):
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", type=device, default=defaults.device, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"],
                   help="weight dtype; float32 weights + bf16 autocast on CUDA is the standard mixed precision")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward to save memory (default: on for CUDA, off on CPU)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="under torchrun: FSDP keeps the parameter shards, gradients and optimiser state in CPU memory "
                        "(slower steps, room for a larger model; needs --device cuda)")
    g.add_argument("--plan", action="store_true",
                   help="print the memory plan (bytes by component, from the shapes alone: --model may be a config.json) "
                        "and exit without training")
    g.add_argument("--json", action="store_true", help="with --plan: print it as JSON")
    g.add_argument("--gpu-memory-gib", type=positive_float, default=None,
                   help="with --plan: the GPU's memory (default: the current GPU's, else 80)")
    g.add_argument("--plan-gpus", type=positive_int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="with --plan: the GPUs of a torchrun run (FSDP shards weights, gradients and the optimiser "
                        "over them); the plan is per GPU")
    g.add_argument("--plan-prompt-tokens", type=positive_int, default=512,
                   help="with --plan: prompt length assumed for the KV cache and RL activations")
    g = parser.add_argument_group("LoRA (nanocausal/lora: y = W x + (alpha / r) B A x, base frozen)")
    g.add_argument("--lora-rank", type=non_negative_int, default=defaults.lora_rank,
                   help="rank r of the adapters (0: full fine-tuning); with LoRA use about 10x the full-fine-tuning lr")
    g.add_argument("--lora-alpha", type=non_negative_float, default=defaults.lora_alpha, help="the adapters' scale is alpha / r")
    g.add_argument("--lora-dropout", type=below_one, default=defaults.lora_dropout, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
                   default=defaults.lora_targets, help="comma-separated linear layers of each block that get adapters")
    return g


def add_eval_args(parser, defaults):
    g = parser.add_argument_group("evaluation (official CauGym scoring on held-out problems, through the sampler)")
    g.add_argument("--eval-every", type=non_negative_int, default=defaults.eval_every,
                   help="evaluate before the first step and every this many steps (0: never)")
    g.add_argument("--eval-data", default=defaults.eval_data, help="CauGym/rl file to evaluate on; default: held-out generated problems")
    g.add_argument("--eval-problems", type=positive_int, default=defaults.eval_problems, help="number of held-out problems")
    g.add_argument("--eval-samples", type=positive_int, default=defaults.eval_samples, help="samples per problem (official: 5)")
    g.add_argument("--eval-batch-size", type=positive_int, default=defaults.eval_batch_size, help="problems decoded at once (continuous batching: x eval-samples rows)")
    g.add_argument("--eval-max-new-tokens", type=positive_int, default=defaults.eval_max_new_tokens,
                   help="generation budget per sample")
    g.add_argument("--eval-temperature", type=non_negative_float, default=defaults.eval_temperature,
                   help="sampling temperature, 0 = greedy (official: 0.6)")
    g.add_argument("--eval-top-p", type=top_p, default=defaults.eval_top_p, help="nucleus sampling threshold (official: 0.95)")
    g.add_argument("--show-completions", type=non_negative_int, default=defaults.show_completions,
                   help="evaluation completions printed each time")
    return g


def add_output_args(parser, defaults):
    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=defaults.out_dir, help="writes checkpoint/ (a Hugging Face folder) and metrics.jsonl here")
    g.add_argument("--save-every", type=positive_int, default=defaults.save_every,
                   help="write a checkpoint every this many steps (and at the end, and on Ctrl-C)")
    g.add_argument("--log-every", type=positive_int, default=defaults.log_every, help="print a progress line every this many steps")
    g.add_argument("--report-to", type=report_backends, default=defaults.report_to,
                   help="also send every metrics.jsonl row to wandb, trackio or tensorboard (comma-separated; "
                        "offline when there is no network; see nanocausal/tracking.py)")
    g.add_argument("--run-name", default=defaults.run_name, help="the run's name in the tracker (default: out-dir's folder name)")
    g.add_argument("--project", default=defaults.project, help="the wandb / trackio project")
    g.add_argument("--keep", type=positive_int, default=defaults.keep,
                   help="checkpoints kept: out-dir/checkpoint and the keep - 1 before it (out-dir/checkpoint-STEP)")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from out-dir/checkpoint (weights, optimiser, data position, RNG); "
                        "from step 0 when there is none yet")
    g.add_argument("--overwrite", action="store_true", help="start again in an out-dir that already holds a run (deletes it)")
    g.add_argument("--allow-changed-args", action="store_true",
                   help="resume even though settings that change the run (lr, batch sizes, model, ...) differ from the saved ones")
    return g


def add_offline_data_args(parser, defaults, data_help, batch_help):
    """The data and batch flags of the offline trainers (SFT, DPO, KTO)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help=data_help)
    g.add_argument("--num-train", type=positive_int, default=defaults.num_train,
                   help="number of problems to generate when --data is not given")
    g.add_argument("--max-length", type=positive_int, default=defaults.max_length,
                   help="context length; a longer example is an error naming its file and line")
    g.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help=batch_help)
    g.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum,
                   help="micro-batches per optimiser step (effective batch = batch-size * grad-accum)")
    g.add_argument("--micro-batch-tokens", type=non_negative_int, default=defaults.micro_batch_tokens,
                   help="also cut a micro-batch before it passes this many padded tokens (0: no limit): memory "
                        "follows tokens, not examples; the loss is the same")
    return g


def add_train_args(parser, defaults):
    """Every group above, in --help order."""
    add_model_args(parser, defaults)
    add_optimisation_args(parser, defaults)
    add_hardware_args(parser, defaults)
    add_eval_args(parser, defaults)
    add_output_args(parser, defaults)

# -----------------------------------------------------------------------------
# Flags -> config, and errors


def config_from_args(config_class, args, **overrides):
    """An instance of the dataclass config_class with every field read from the parsed flag of
    the same name (fields without a flag keep their default), then `overrides`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return config_class(**{**values, **overrides})


def run_main(main):
    """Run main(); a user error (bad file, bad flag value, missing checkpoint) is printed as one
    line naming what is wrong, without a traceback, unless NANOCAUSAL_DEBUG=1."""
    from nanocausal import distributed
    try:
        if os.environ.get("NANOCAUSAL_DEBUG") == "1":
            return main()
        try:
            return main()
        except (ValueError, OSError, KeyError, RecursionError, jinja2.TemplateError) as e:
            # (not RuntimeError, TypeError, ...: from torch or our code those are bugs, and keep their traceback)
            if isinstance(e, KeyError):
                message = f"missing key {e}"
            elif isinstance(e, RecursionError):
                message = "input nested too deeply to read (RecursionError)"
            else:
                message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
            sys.exit(f"error: {message} (NANOCAUSAL_DEBUG=1 for the traceback)")
    finally:
        distributed.teardown()  # under torchrun: leave the process group cleanly
