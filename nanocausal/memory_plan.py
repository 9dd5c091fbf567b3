"""The memory plan of a training run (--plan): the bytes it will hold on its GPU, component by
component, from the model's shapes alone (a meta-device model: nothing is allocated), so a user
learns before loading anything whether the run fits and, if not, which flag to change first.

P = parameters, T = trainable parameters (P for full fine-tuning, the adapters with LoRA),
w = bytes per weight (4 float32, 2 bfloat16), a = bytes per activation (2 under bf16 autocast on
CUDA, else w), C hidden size, F MLP width, H/K query/key-value heads of size D, L layers, V vocab:

    weights        P_base * w  (+ LoRA adapters * 4: they stay float32)
    gradients      T * (w, or 4 for LoRA adapters)            exist from backward to the optimiser step
    optimizer      T * 2 * 4 + 4 per tensor: AdamW's m and v, float32 whatever w, and its step; for
                   bf16 weights (full fine-tuning) T * 2 more: each weight's low 16 bits (optimizer.AdamW)
    optimizer_temporaries  what an AdamW step allocates: for bf16 weights two float32 chunks,
                   2 * 4 * min(largest trainable tensor, optimizer.AdamW.CHUNK); for float32 trainables 0
                   on CUDA (torch's fused AdamW), on CPU 4 * max(2 n_i + n_(i-1)) over consecutive
                   tensors i (torch's single-tensor loop: sqrt(v), its quotient, the last one's quotient)
    reference      P * w_ref when a separate frozen copy is loaded (DPO/KTO unless --precompute-ref;
                   GRPO with --beta > 0, PPO with --kl-coef > 0; bf16 on CUDA for RL); 0 with LoRA
    value_model    PPO's value head: (C + 1) * 4 * 4
    rollout_copy   P * 2 for float32 weights on CUDA: the bf16 copy generation reads, kept for the run
                   (generate.compute_dtype_weights); 0 for bf16 weights. LoRA RL on one GPU, when the
                   generation phase then fits (result["merge_lora"]): lora.merged_copy_bytes, alive in
                   that phase only (the rollouts use lora.merged_for_generation); else as above
    kv_cache       rows * (prompt + new tokens) * L * 2 * K * D * a, rows = --rollout-slots, or
                   prompts x group size (the rollouts' cache, in the compute dtype)
    prefill_cache  (rows / group size) * prompt * L * 2 * K * D * a: the prompts admitted at once
    activations    what backward keeps per layer, per micro-batch of N tokens (--micro-batch-size
                   sequences of prompt + new tokens, or --micro-batch-tokens when smaller):
                   N * (6C + 3HD + 2KD + 5F) * a; with --activation-checkpointing only each layer's
                   input, N * C * a, plus one layer's worth recomputed at a time
    logits_chunk   chunk * V * 4 * 3: one chunk of float32 logits, their log-softmax and its exp
                   (logprobs.token_logprobs never holds more)

With --plan-gpus N > 1 (a torchrun run, nanocausal/distributed.py) the plan is per GPU: FSDP
divides weights, gradients, optimizer and reference by N; the rollouts' rows are the rank's share
(prompts x group size / N); rollout_copy is the full bf16 copy each rank gathers for its rollouts,
P * 2 on CUDA, alive in the generation phase only; and

    fsdp_unsharded the units FSDP has all-gathered while it computes: the root (embeddings, final
                   norm, head: it stays gathered) and two blocks (the one computing and the one
                   prefetched), in bf16 on CUDA

A step is two phases that do not overlap: generation (weights, rollout copy, optimizer state,
reference, KV cache: gradients were freed by the last step) and training (weights, rollout copy,
optimizer state, reference, gradients, then activations and logits chunk, or the optimiser's
temporaries once backward is done). The total is the larger phase. weights, gradients, optimizer,
optimizer_temporaries and KV cache are exact (tests/test_memory_plan.py compares them with the real tensors
after a real step); activations are an estimate of what autograd saves (SDPA and allocator
workspaces, fragmentation not included): read the total with ~15 % to spare. check_fits refuses,
before a run starts, one whose exact components alone exceed the memory available now.
"""
import json
import os

import torch

from nanocausal import checkpoint, lora, optimizer
from nanocausal.model import Transformer

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2}


def meta_model(name_or_path):
    """The model of --model (a folder, a hub id, a LoRA adapter or a config.json) on the meta device."""
    if str(name_or_path).endswith(".json") and os.path.isfile(name_or_path):
        config = checkpoint.read_config(name_or_path)
    else:
        folder = checkpoint.resolve(name_or_path, ["config.json", lora.ADAPTER_CONFIG])
        if checkpoint.is_adapter(folder):
            return meta_model(checkpoint.adapter_base(folder, ["config.json"]))  # (no weights)
        config = checkpoint.read_config(os.path.join(folder, "config.json"))
    with torch.device("meta"):
        return Transformer(config)


def count(params):
    return sum(p.numel() for p in params)


def plan(config, algo, prompt_tokens=512, gpu_memory_gib=None, gpus=1):
    """The plan of `config` (an SFTConfig, PreferenceConfig or RLConfig) for algo sft, dpo, kto,
    grpo or ppo, per GPU of `gpus` under torchrun: bytes per component and phase, whether it fits,
    and the first flag to change when it does not."""
    model = meta_model(config.model)
    mc = model.config
    cuda = str(config.device).startswith("cuda")
    w = BYTES[config.dtype]
    act = 2 if cuda else w
    base = count(model.parameters())
    model.to(getattr(torch, config.dtype))  # (meta: nothing moves)
    if config.lora_rank > 0:
        lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    adapters = count(p for n, p in model.named_parameters() if ".lora_" in n)
    trainable = adapters or base
    rl = algo in ("grpo", "ppo")

    precomputed = getattr(config, "precompute_ref", False)
    needs_reference = {"dpo": not precomputed, "kto": not precomputed, "grpo": getattr(config, "beta", 0) != 0,
                       "ppo": getattr(config, "kl_coef", 0) != 0}.get(algo, False)
    reference = base * (2 if rl and cuda else (4 if rl else w)) if needs_reference and not adapters else 0
    value = (mc.hidden_size + 1) * 4 * 4 if algo == "ppo" else 0

    kv_cache = prefill_cache = 0
    per_token_kv = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * act
    if rl:
        rows = min(config.rollout_slots or 1 << 62, max(1, config.prompts_per_step // gpus) * config.group_size)
        kv_cache = rows * (prompt_tokens + config.max_new_tokens) * per_token_kv
        prefill_cache = max(1, rows // config.group_size) * prompt_tokens * per_token_kv  # the prompts admitted at once
        tokens = config.micro_batch_size * (prompt_tokens + config.max_new_tokens)
        if getattr(config, "micro_batch_tokens", 0):
            tokens = min(tokens, max(config.micro_batch_tokens, prompt_tokens + config.max_new_tokens))
        chunk = config.logits_chunk_size
    else:
        tokens = config.batch_size * (2 if algo == "dpo" else 1) * config.max_length
        chunk = 1024
    C, F, L = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    HD, KD = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    per_layer = tokens * (6 * C + 3 * HD + 2 * KD + 5 * F) * act
    activations = (L * tokens * C * act + per_layer) if config.activation_checkpointing else L * per_layer
    logits_chunk = chunk * mc.vocab_size * 4 * 3

    trainable_tensors = [p.numel() // gpus for p in model.parameters() if p.requires_grad]
    if adapters or config.dtype == "float32":  # float32 trainables: torch.optim.AdamW (make_optimizer)
        # the CPU loop of the module docstring, run per group of make_optimizer (matrices, then the rest)
        groups = [[p.numel() // gpus for p in model.parameters() if p.requires_grad and (p.dim() >= 2) == matrices]
                  for matrices in (True, False)]
        temporaries = 0 if cuda else 4 * max(2 * n + previous for g in groups for previous, n in zip([0] + g, g))
    else:
        temporaries = 2 * 4 * min(max(trainable_tensors), optimizer.AdamW.CHUNK)
    low_bits = 0 if adapters or config.dtype == "float32" else 2 * base
    sharded = gpus > 1
    block = count(model.layers[0].parameters())
    unsharded = (base - (L - 2) * block) * (2 if cuda else w) if sharded else 0  # the root and two blocks
    components = {
        "weights": ((base * w) + adapters * 4) // gpus,
        "gradients": (adapters * 4 if adapters else base * w) // gpus,
        "optimizer": (trainable * 2 * 4 + low_bits + 4 * len(trainable_tensors)) // gpus,
        "optimizer_temporaries": temporaries,
        "reference": reference // gpus,
        "value_model": value,
        "rollout_copy": (base + adapters) * 2 if cuda and (config.dtype == "float32" or sharded) and (rl or not sharded) else 0,
        **({"fsdp_unsharded": unsharded} if sharded else {}),
        "kv_cache": kv_cache,
        "prefill_cache": prefill_cache,
        "activations": activations,
        "logits_chunk": logits_chunk,
    }
    if gpu_memory_gib is None:
        gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80
    gpu = int(gpu_memory_gib * GIB)
    resident = components["weights"] + components["optimizer"] + components["reference"] + value
    # LoRA rollouts on one GPU: a merged copy (lora.merged_for_generation) when the generation phase holds it
    merged = lora.merged_copy_bytes(model, torch.bfloat16) if adapters and rl and cuda and not sharded else 0
    merge_lora = bool(merged) and resident + kv_cache + prefill_cache + merged <= gpu
    if merge_lora:
        components["rollout_copy"] = merged
    copy = components["rollout_copy"]
    copy_in_training = 0 if sharded or merge_lora else copy  # torchrun and merged: made for the rollouts, then freed
    phases = {"generation": resident + copy + kv_cache + prefill_cache if rl else 0,
              "training": resident + copy_in_training + components["gradients"] + unsharded
              + max(activations + logits_chunk, temporaries)}
    total = max(phases.values())
    result = {"model": str(config.model), "algo": algo, "gpus": gpus, "parameters": base + adapters, "trainable_parameters": trainable,
              "bytes": components, "phases": phases, "total_bytes": total, "gpu_bytes": gpu, "fits": total <= gpu,
              "merge_lora": merge_lora}
    result["advice"] = None if result["fits"] else advice(config, components, phases, rl, adapters)
    return result


def advice(config, components, phases, rl, adapters):
    """The first flag to change, for the largest thing that can shrink."""
    largest_phase = max(phases, key=phases.get)
    state = components["gradients"] + components["optimizer"]
    if not adapters and state >= max(components["activations"], components["kv_cache"]):
        return "--lora-rank 32 (about 10x the learning rate): gradients and AdamW state are most of it"
    if config.dtype == "float32" and components["weights"] >= components["activations"]:
        return "--dtype bfloat16: the weights are float32"
    if largest_phase == "generation":
        return "--rollout-slots or --max-new-tokens: the rollouts' KV cache is the largest part"
    if components["reference"] >= components["activations"]:
        return "--lora-rank 32 (the reference becomes the adapters-off model)" + (
            "" if rl else " or --precompute-ref")
    if not config.activation_checkpointing:
        return "--activation-checkpointing: backward keeps every layer's activations"
    return ("--micro-batch-size" if rl else "--batch-size with more --grad-accum") + ": activations of a micro-batch"


def format_plan(result):
    lines = [f"memory plan: {result['algo']} on {result['model']}: {result['parameters']:,} parameters, "
             f"{result['trainable_parameters']:,} trainable" + (f"; per GPU of {result['gpus']}" if result["gpus"] > 1 else "")]
    for name, value in result["bytes"].items():
        lines.append(f"  {name:<21} {value / GIB:9.2f} GiB")
    for name, value in result["phases"].items():
        if value:
            lines.append(f"  {name + ' phase':<22}{value / GIB:9.2f} GiB")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"  total {result['total_bytes'] / GIB:.2f} GiB of {result['gpu_bytes'] / GIB:.0f} GiB: {verdict}"
                 + (f"; change first: {result['advice']}" if result["advice"] else ""))
    return "\n".join(lines)


def report(config, algo, as_json=False, prompt_tokens=512, gpu_memory_gib=None, gpus=1):
    """--plan: print the plan (as JSON with --json) and return it."""
    result = plan(config, algo, prompt_tokens, gpu_memory_gib, gpus)
    print(json.dumps(result, indent=2) if as_json else format_plan(result))
    return result


# Which flags make each component large: named when a run cannot fit.
COMPONENT_FLAGS = {"weights": "--model / --dtype / --lora-rank", "gradients": "--lora-rank", "optimizer": "--lora-rank",
                   "reference": "--lora-rank / --precompute-ref / --beta / --kl-coef",
                   "rollout_copy": "--model / --dtype", "fsdp_unsharded": "--model",
                   "kv_cache": "--prompts-per-step / --group-size / --rollout-slots / --max-new-tokens",
                   "prefill_cache": "--prompts-per-step / --rollout-slots"}


def available_bytes(device):
    """Memory a run may still take on `device`: the GPU's free memory, or the RAM the kernel reports
    as available (MemAvailable: free plus reclaimable caches) on a CPU; None when unknown."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_problem(text):
    """None when this machine has the device `text`, else why not (one line naming --device)."""
    dev = torch.device(text)  # (already checked by the config: cli.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {text}: this machine has no CUDA GPU (use --device cpu)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {text}: MPS is not available on this machine"
    return None


def check_fits(config, algo):
    """Refuse, before anything is allocated or written, a run this machine cannot hold: a --device
    it lacks, or one whose certain bytes (all but the activations and logits chunk, which follow the
    real sequence lengths) exceed the memory available now (instead of the OOM killer mid-way). A
    ValueError of one line naming the flags of the largest components; on the CPU, torchrun's ranks
    share one machine's RAM."""
    if problem := device_problem(config.device):
        raise ValueError(problem)
    available = available_bytes(config.device)
    if available is None:
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    result = plan(config, algo, gpu_memory_gib=available / GIB, gpus=gpus)
    certain = {k: v for k, v in result["bytes"].items() if k not in ("activations", "logits_chunk")}
    sharing = 1 if str(config.device).startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    resident = sum(certain[k] for k in ("weights", "optimizer", "reference", "value_model", "rollout_copy"))
    generation = certain["kv_cache"] + certain["prefill_cache"]
    training = certain["gradients"] + certain.get("fsdp_unsharded", 0) + certain["optimizer_temporaries"]
    needed = (resident + max(generation, training)) * sharing
    if needed > available:
        largest = sorted((k for k in certain if certain[k] and k in COMPONENT_FLAGS), key=certain.get, reverse=True)[:2]
        parts = ", ".join(f"{k} {certain[k] / GIB:.1f} GiB ({COMPONENT_FLAGS[k]})" for k in largest)
        raise ValueError(f"this run needs at least {needed / GIB:.1f} GiB on {config.device} but {available / GIB:.1f} GiB "
                         f"is available: {parts}; make them smaller (--plan prints the whole plan)")
