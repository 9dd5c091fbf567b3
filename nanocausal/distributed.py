"""Several processes, one run: what `torchrun --nproc-per-node N train_sft.py ...` changes.

torchrun starts N copies of the script and gives each RANK, WORLD_SIZE and LOCAL_RANK in its
environment; `setup` joins them into one process group (nccl on CUDA, one GPU per process, with
gloo beside it for CPU scalars; gloo alone on CPU, which is how the tests run 2 ranks on a laptop).
With WORLD_SIZE 1 (plain `python train_sft.py`) nothing here does anything, so the single-process
code path is the same code.

Sharding is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block is
one unit and the whole model (embeddings, final norm, head) the root unit. Every parameter lives
as a DTensor of which each rank holds 1/N (dim 0); a unit's forward all-gathers its full weights,
its backward reduce-scatters the gradients, so each rank's optimiser updates only its own shard:
weights, gradients and AdamW moments all take 1/N of the memory. On CUDA the all-gathered weights
are bf16 and gradients are reduced in float32 (MixedPrecisionPolicy); --cpu-offload keeps the
shards and the optimiser on the CPU.

The batch is global. A step's examples are cut into N equal contiguous shares (`share`), each
rank runs its share, and every loss is divided by the *global* count of its step (tokens or
examples, `all_sum`). FSDP is told to sum the ranks' gradients rather than average them, so the
gradient on N ranks is the gradient of the one-process loss, whatever N:

    grad = sum over ranks r of d(loss_r / N_global) / dw = d(sum_r loss_r / N_global) / dw

One rule every caller must keep: the units' all-gathers are collectives, so every rank must run
the same number of forward (and backward) passes. A rank whose share cuts into fewer
micro-batches runs zero-weight repeats (`pad_to_longest`).
"""
import gc
import json
import os
import shutil

import torch
import torch.distributed as dist

from nanocausal import checkpoint, lora
from nanocausal.model import Transformer
from nanocausal.safe_files import load_plain, read_json, read_tensors


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


# The process group's backend for each kind of device: nccl reduces CUDA tensors only, so a CUDA run
# adds gloo for the CPU scalars (token counts, metric sums, flags) the helpers below reduce.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup(device):
    """Join torchrun's process group when there is one (WORLD_SIZE > 1); returns this rank's device
    (cuda:LOCAL_RANK for --device cuda). A no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS["cuda" if cuda else "cpu"])
    return device


def teardown():
    if dist.is_initialized():
        # Sharded modules left in a reference cycle (a refused resume's model, kept alive by the
        # error's traceback) hold FSDP state that refers to the process group. Freed only at
        # interpreter exit, after the group is gone, they can abort the process ("terminate called
        # without an active exception"; half the runs of tests/test_hostile_checkpoints.py's 2-rank
        # worker did): free them while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()

# -----------------------------------------------------------------------------
# Sharding


def shard(model, device, cpu_offload=False):
    """FSDP2 on every block, then on the whole model; returns the model (now holding DTensors).
    Trainable and frozen parameters (LoRA) may share a unit. Any other module is one unit."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)
    cuda = str(device).startswith("cuda")
    if cpu_offload and not cuda:
        raise ValueError("--cpu-offload moves GPU shards to the CPU: it needs --device cuda")
    settings = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                                   reduce_dtype=torch.float32),
                    offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    if not hasattr(model, "layers"):  # a small module of its own (PPO's value head): one float32 unit
        fully_shard(model, offload_policy=settings["offload_policy"])
    else:
        for block in model.layers:
            fully_shard(block, **settings)
        fully_shard(model, **settings)
        # the trainers also call model.hidden_states (the trunk): FSDP must gather the root around it
        register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum the ranks' gradients (see the docstring),
            module.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no pre-multiplied sum)
    return model


def full_tensor(t):
    """The whole tensor of a (possibly sharded) parameter; a collective when it is a DTensor."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module, device="cpu", dtype=None):
    """{name: full tensor} of every parameter, on `device` (and floats in `dtype`), one all-gather at
    a time, so at most one full parameter exists beyond the result (every rank must call it; every
    rank gets the tensors). A tied head appears once, as the embedding."""
    # each shard is cast before the gather (bf16 moves half the bytes of float32; the cast is per element)
    return {name: full_tensor(p.detach().to(dtype if dtype and p.dtype.is_floating_point else p.dtype)).to(device)
            for name, p in module.named_parameters()}


def gathered_copy(model, on_every_rank=False, device="cpu", dtype=None):
    """A plain (unsharded) copy of a sharded model, with its LoRA adapters and the attributes a
    checkpoint reads: on rank 0 only (None elsewhere), or on every rank. Every rank must call it
    (the gathers are collectives). Rank 0 writes it as the Hugging Face folder; on every rank, in
    the compute dtype, it is the generation copy of the RL rollouts (see rl.py)."""
    state = full_state_dict(model, device, dtype)
    if not (on_every_rank or is_main()):
        return None
    with torch.device("meta"):
        copy = Transformer(model.config)
    if lora.is_lora_model(model):
        settings = model.lora
        lora.add_lora(copy, settings["r"], settings["lora_alpha"], settings["lora_dropout"], settings["target_modules"])
        copy.lora_base = model.lora_base
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = copy.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad))
    if model.config.tie_word_embeddings:
        copy.lm_head.weight = copy.embed_tokens.weight
    copy.reset_rope(device)
    return copy.eval()

# -----------------------------------------------------------------------------
# Checkpoints: rank 0 writes the Hugging Face folder, every rank its optimiser shard


def optimised_modules(model, extra_modules):
    """What the optimiser state belongs to, for its sharded state dict: the policy, and PPO's value head."""
    return torch.nn.ModuleDict({"model": model, **extra_modules}) if extra_modules else model


def shard_file_names(r):
    """The files rank r adds to a checkpoint: its optimiser shard (tensors, the rest) and RNG state."""
    return [f"optimizer-rank{r}.safetensors", f"optimizer-rank{r}.json", f"rng-rank{r}.pt"]


def local(t):
    """This rank's part of a (possibly sharded) tensor: a DTensor's local shard, a tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def save_checkpoint(ckpt_dir, model, tokenizer_source, optimizer, trainer_state, extra_modules=None, keep=1):
    """checkpoint.save_checkpoint under torchrun (every rank calls it). Every rank stages its shard
    of the optimiser state, {"state": {parameter name: {"exp_avg": DTensor, ...}}, "param_groups":
    [...]} (get_optimizer_state_dict): the local tensors in optimizer-rankR.safetensors as
    "state.NAME.KEY", the rest in optimizer-rankR.json, its RNG state in rng-rankR.pt (tensors and
    plain types, read back with weights_only=True). No pickle anywhere, so a resume cannot run code
    planted in a checkpoint. Rank 0 then writes the Hugging Face folder from the gathered weights,
    moving the staged files in before its manifest, so the save stays crash-safe."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    staging = ckpt_dir + ".shards"
    if is_main():
        shutil.rmtree(staging, ignore_errors=True)  # left over by a save that a crash interrupted
        os.makedirs(staging)
    barrier()
    state = get_optimizer_state_dict(optimised_modules(model, extra_modules), optimizer)
    tensors, plain = {}, {"state": {}, "param_groups": state["param_groups"]}
    for name, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{name}.{key}"] = local(value).detach().contiguous().cpu()
            else:
                plain["state"].setdefault(name, {})[key] = value
    tensors_file, json_file, rng_file = (os.path.join(staging, n) for n in shard_file_names(rank()))
    save_file(tensors, tensors_file)
    with open(json_file, "w") as f:
        json.dump(plain, f)
    torch.save(checkpoint.rng_state(), rng_file)
    copy = gathered_copy(model)
    extras = {name: full_state_dict(module) for name, module in (extra_modules or {}).items()}
    if is_main():
        checkpoint.save_checkpoint(ckpt_dir, copy, tokenizer_source, None, trainer_state, extras, keep=keep,
                                   staged=staging)
    barrier()


def fill_optimizer_state(template, folder):
    """Copy this rank's saved shard into `template` (get_optimizer_state_dict of the fresh
    optimiser: every tensor already there at its local shape), refusing with one line naming the
    file and tensor anything that does not fit: a missing or extra tensor, another local shape or
    dtype, other parameter groups. Returns the RNG state saved beside it."""
    names = shard_file_names(rank())
    checkpoint.verify(folder, names)
    tensors_file, json_file, rng_file = paths = [os.path.join(folder, n) for n in names]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{folder} cannot be resumed under torchrun: it has no {os.path.basename(path)}")
    saved, plain = read_tensors(tensors_file), read_json(json_file)
    expected = {}
    for name, values in template["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                expected[f"state.{name}.{key}"] = local(value)
            elif not (isinstance(plain.get("state"), dict) and key in plain["state"].get(name, {})):
                raise ValueError(f"{json_file}: no value for state {name} {key}")
            else:
                values[key] = plain["state"][name][key]
    for key in sorted(saved.keys() ^ expected.keys()):
        raise ValueError(f"{tensors_file}: " + (f"unexpected tensor {key}" if key in saved else f"missing tensor {key}"))
    for key, tensor in saved.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(f"{tensors_file}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')} "
                             f"{tuple(tensor.shape)}, this rank's optimiser holds {str(want.dtype).removeprefix('torch.')}"
                             f" {tuple(want.shape)}")
        with torch.no_grad():
            want.copy_(tensor)
    groups = plain.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(template["param_groups"]) or any(
            not isinstance(g, dict) or g.get("params") != t["params"] for g, t in zip(groups, template["param_groups"])):
        raise ValueError(f"{json_file}: its param_groups do not hold this model's parameters in the same groups")
    for group, ours in zip(groups, template["param_groups"]):
        for key, value in ours.items():
            if key not in group:
                raise ValueError(f"{json_file}: param_groups lack {key!r}")
            ours[key] = tuple(group[key]) if isinstance(value, tuple) else group[key]  # JSON has no tuples (betas)
    return load_plain(rng_file, "an RNG state")


def load_shards(folder, saved_world_size, model, extra_modules, optimizer):
    """Restore what save_checkpoint wrote for this rank: its optimiser shard and RNG state. When a
    rank cannot (a damaged or foreign file), every rank stops with one line: they agree first, so
    none is left waiting in a collective for the one that stopped."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if saved_world_size != world_size():
        raise ValueError(f"{folder} was saved by {saved_world_size} processes: resume it with as many")
    if any(n == ".metadata" or n.endswith(".distcp") for n in os.listdir(folder)):
        raise ValueError(f"{folder} holds torch.distributed.checkpoint files (.metadata, .distcp), a format "
                         f"nanocausal no longer reads because reading it unpickles: resume from a newer checkpoint")
    modules = optimised_modules(model, extra_modules)
    template = get_optimizer_state_dict(modules, optimizer)  # initialises the state: every tensor at its shape
    error, rng = None, None
    try:
        rng = fill_optimizer_state(template, folder)
    except ValueError as e:
        error = e
    if all_sum(int(error is not None)):
        raise error or ValueError(f"{folder}: another rank could not read its optimiser shard (its error is above)")
    set_optimizer_state_dict(modules, optimizer, template)
    checkpoint.set_rng_state(rng)

# -----------------------------------------------------------------------------
# The global batch


def share(items):
    """This rank's contiguous share of a step's items (their number must divide by the world size)."""
    n, r = world_size(), rank()
    if len(items) % n:
        raise ValueError(f"{len(items)} examples per step do not split evenly over {n} ranks: make the batch "
                         f"(batch-size x grad-accum, or prompts-per-step) a multiple of {n}")
    size = len(items) // n
    return items[r * size:(r + 1) * size]


def all_sum(value):
    """The sum over ranks of a number or tensor (a float32/int tensor comes back on its device)."""
    if world_size() == 1:
        return value
    t = torch.as_tensor(value).clone()
    dist.all_reduce(t)
    return t if torch.is_tensor(value) else t.item()


def all_max(value):
    if world_size() == 1:
        return value
    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_sums(sums, device):
    """{name: float32 sum over ranks} of every name any rank has in `sums` (a rank that ran no
    micro-batch may have none)."""
    names = sorted(set().union(*all_objects(sorted(sums))))
    return {k: all_sum(torch.as_tensor(sums.get(k, 0.0), device=device).float()) for k in names}


def all_lists(*lists):
    """Each list concatenated over the ranks, in rank order (every rank gets every item)."""
    parts = all_objects(lists)
    return [[x for part in parts for x in part[i]] for i in range(len(lists))]


def all_cat(t, dim=-1):
    """Every rank's tensor (the same shape on each), concatenated in rank order along dim."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def pad_to_longest(chunks, filler=None):
    """chunks + zero-weight repeats of its last one (or of `filler` when it is empty) up to the
    longest list on any rank: [(chunk, weight)], weight 1 for the real ones and 0 for the repeats
    (the module docstring's one rule: every rank runs as many passes as the busiest one)."""
    longest = all_max(len(chunks))
    repeat = chunks[-1] if chunks else filler
    return [(c, 1.0) for c in chunks] + [(repeat, 0.0)] * (longest - len(chunks))


def all_objects(obj):
    """Every rank's picklable object, in rank order (a list of one in a single process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
