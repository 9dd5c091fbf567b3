"""Command-line plumbing shared by the scripts: typed argument checks, settings (a config field
and its flag described once: setting, add_config_args, check_config), flags -> a config dataclass,
and one-line errors. A train script reads its config with config_from_flags(__doc__, ItsConfig)
and hands it to its trainer.
"""
import argparse
import dataclasses
import math
import os
import sys

import jinja2

from nanocausal import caugym, scm, tracking


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help prints the script's docstring as written and each flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors of one line (the flag and what was expected), like every other error
    of the scripts; --help still prints the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser_for(doc):
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)

# -----------------------------------------------------------------------------
# Argument types: a bad value is refused by argparse with the flag's name. Every number must be
# finite (inf or nan in a learning rate or a temperature poisons a run silently), and lie in the
# range its formula allows: a probability in [0, 1], top-p in (0, 1], ...


def integer_in(low, high, expected):
    """The argparse type of an integer in [low, high]; its error says `expected`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return parse


positive_int = integer_in(1, math.inf, "a positive integer")
non_negative_int = integer_in(0, math.inf, ">= 0")
seed = integer_in(0, 2**63 - 1, "an integer in [0, 2**63)")  # numpy's and torch's generators take [0, 2**63)
graph_size = integer_in(2, 16, "a graph size in 2..16")  # --nodes of eval.py's generated sets: what the generator draws


def number_in(low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """The argparse type of a finite float between low and high (excluded when low_open /
    high_open); its error says the interval: "must be a finite number in [0, 1]", "... >= 0"."""
    interval = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if high < math.inf \
        else f" {'>' if low_open else '>='} {low:g}" if low > -math.inf else ""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low) or \
                (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be a finite number{interval}, got {text}")
        return value
    return parse


finite_float = number_in()
non_negative_float = number_in(0)
positive_float = number_in(0, low_open=True)
probability = number_in(0, 1)  # a share, a ratio, GAE's gamma and lambda, dropout...
top_p = number_in(0, 1, low_open=True)  # nucleus mass: 0 keeps no token at all
below_one = number_in(0, 1, high_open=True)  # dropout: 1 drops everything


def device(text):
    """--device: cpu, cuda, cuda:N or mps; whether this machine has it is checked when a run starts
    (memory_plan.device_problem), so that --plan may plan a GPU run on a laptop."""
    import torch
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def report_backends(text):
    """--report-to: names known and packages installed, before any model is loaded."""
    try:
        tracking.check(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def name_list(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


def task_list(text):
    tasks = name_list(text)
    if not tasks or any(t not in caugym.TASKS for t in tasks):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(caugym.TASKS)}, got {text}")
    return tasks


def variant_list(text):
    variants = name_list(text)
    if not variants or any(v not in caugym.VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"expected one or a comma-separated mix of {','.join(caugym.VARIANTS)}, got {text}")
    return text


def graph_sizes(text):
    """--nodes: N or LO-HI, graph sizes the generator can draw (2..16)."""
    try:
        scm.size_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

# -----------------------------------------------------------------------------
# Settings: a config field and its flag, described once


def setting(default, help, type=None, choices=None, resume=None, group=None, flags=()):
    """A field of a config dataclass that is also a flag (--grad-accum for grad_accum): `help` is
    both the field's description and the flag's --help, `type` the flag's argparse type (and the
    field's check), `group` the --help heading that starts at this field, `flags` more spellings.
    `resume` is what a resumed run may do with it: None (changing it changes the run: refused
    unless --allow-changed-args), "free" (it changes nothing the run computes: steps, logging,
    hardware), "content" (a path: compared by what it names) or "fixed" (never: the checkpoint is
    built for it)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, type=type, choices=choices, resume=resume, group=group, flags=flags))


def about(config_class, name):
    """The setting() metadata of field `name`, merged from the base class down (a subclass's
    setting() overrides what it restates)."""
    merged = {}
    for cls in reversed(config_class.__mro__):
        field = getattr(cls, "__dataclass_fields__", {}).get(name)
        if field is not None:
            merged.update({k: v for k, v in field.metadata.items() if v is not None and v != ()})
    return merged


def add_config_args(parser, config_class):
    """One flag per setting of config_class, the subclass's own ones first, grouped under the
    headings their fields name; returns {heading: argument group}."""
    mro = config_class.__mro__
    def declared_by(field):  # the base-most class that has the field
        return max(mro.index(c) for c in mro if field.name in getattr(c, "__dataclass_fields__", {}))
    groups, group = {}, parser
    for field in sorted(dataclasses.fields(config_class), key=declared_by):
        meta = about(config_class, field.name)
        if "group" in meta and meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        group = groups[meta["group"]] if "group" in meta else group
        options = dict(default=None if field.default is dataclasses.MISSING else field.default, help=meta["help"])
        if field.type in (bool, bool | None):  # --x / --no-x when None (= automatic) is a value
            options["action"] = "store_true" if field.type is bool else argparse.BooleanOptionalAction
        else:
            options.update(type=meta.get("type"), choices=meta.get("choices"), nargs="+" if field.type is list else None)
        group.add_argument("--" + field.name.replace("_", "-"), *meta.get("flags", ()), **options)
    return groups


def check_config(config):
    """A config's own check (its __post_init__ calls it): every set field is what its flag would
    accept, else a ValueError naming the flag, so library users get the command line's refusals."""
    for field in dataclasses.fields(config):
        meta, value = about(type(config), field.name), getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if meta.get("type"):
            text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            try:
                meta["type"](text)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{flag} {e}") from None


def config_from_flags(doc, config_class):
    """A train script's flags: config_class's settings, and --plan with its options (the memory plan
    instead of a run: nanocausal/memory_plan.py), parsed once, as a config; with --plan the memory
    plan is printed instead and None returned."""
    parser = parser_for(doc)
    add_config_args(parser, config_class)
    g = parser.add_argument_group("memory plan")
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
    args = parser.parse_args()
    config = config_from_args(config_class, args)
    if not args.plan:
        return config
    from nanocausal import memory_plan
    memory_plan.report(config, getattr(config, "algo", "sft"), args.json, args.plan_prompt_tokens, args.gpu_memory_gib,
                       args.plan_gpus)

# -----------------------------------------------------------------------------
# Flags -> config, and errors


def config_from_args(config_class, args):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def run_main(main):
    """Run main(); a user error (bad file, bad flag value, missing checkpoint) is printed as one
    line naming what is wrong, without a traceback, unless NANOCAUSAL_DEBUG=1."""
    from nanocausal import distributed
    try:
        result = main()
        distributed.barrier()  # under torchrun the ranks leave together: a rank tearing down first can abort another
        return result
    except (ValueError, OSError, KeyError, RecursionError, jinja2.TemplateError) as e:
        # (not RuntimeError, TypeError, ...: from torch or our code those are bugs, and keep their traceback)
        if os.environ.get("NANOCAUSAL_DEBUG") == "1":
            raise
        if isinstance(e, KeyError):
            message = f"missing key {e}"
        elif isinstance(e, RecursionError):
            message = "input nested too deeply to read (RecursionError)"
        else:
            message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        sys.exit(f"error: {message} (NANOCAUSAL_DEBUG=1 for the traceback)")
    finally:
        distributed.teardown()  # under torchrun: leave the process group cleanly
