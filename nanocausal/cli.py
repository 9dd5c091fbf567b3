"""Command-line plumbing shared by the scripts: the flags every trainer has, typed argument
checks, flags -> a config dataclass, and one-line errors.

A script defines its own flags (those of its algorithm), adds the shared groups from here with
the defaults of its config class, parses, and calls `config_from_args(ConfigClass, args)`: every
field of the config is read from the flag of the same name (--grad-accum -> grad_accum).
"""
import argparse
import dataclasses
import os
import sys

from nanocausal import caugym, tracking


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help prints the script's docstring as written and each flag's default."""


def parser_for(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)

# -----------------------------------------------------------------------------
# Argument types: a bad value is refused by argparse with the flag's name


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


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

# -----------------------------------------------------------------------------
# The flags every trainer shares (defaults from its config class)


def add_model_args(parser, defaults, model_help="hub id or local Hugging Face folder to start from"):
    g = parser.add_argument_group("model and generated problems")
    g.add_argument("--model", default=defaults.model, help=model_help)
    g.add_argument("--tasks", type=task_list, default=defaults.tasks,
                   help="comma-separated causal tasks of generated problems (ATE,CDE,ETT,NDE,NIE,PN,PS)")
    g.add_argument("--variant", default=defaults.variant,
                   help=f"problem variant of generated problems ({', '.join(caugym.VARIANTS)}; RL: a comma-separated mix)")
    g.add_argument("--nodes", default=defaults.nodes,
                   help="graph sizes of generated problems: N or LO-HI (default: the generator's, 3-5 nodes for base)")
    return g


def add_optimisation_args(parser, defaults):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=defaults.steps, help="number of optimiser steps (RL: rollout batches)")
    g.add_argument("--lr", type=non_negative_float, default=defaults.lr, help="peak learning rate of AdamW")
    g.add_argument("--warmup-steps", type=non_negative_int, default=defaults.warmup_steps,
                   help="linear warmup steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=non_negative_float, default=defaults.min_lr_ratio,
                   help="the cosine decays to this fraction of --lr (1: constant)")
    g.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                   help="AdamW weight decay (on matrices only)")
    g.add_argument("--clip", type=non_negative_float, default=defaults.clip,
                   help="clip the gradient norm to this value (0: no clipping)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data, its order, the sampler and the model's randomness")
    return g


def add_hardware_args(parser, defaults):
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default=defaults.device, help="cuda or cpu (default: cuda when available)")
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
    g.add_argument("--gpu-memory-gib", type=non_negative_float, default=None,
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
    g.add_argument("--lora-dropout", type=non_negative_float, default=defaults.lora_dropout, help="dropout on the adapters' input")
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
    g.add_argument("--eval-top-p", type=float, default=defaults.eval_top_p, help="nucleus sampling threshold (official: 0.95)")
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
        except (ValueError, OSError, KeyError) as e:
            message = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
            sys.exit(f"error: {message} (NANOCAUSAL_DEBUG=1 for the traceback)")
    finally:
        distributed.teardown()  # under torchrun: leave the process group cleanly
