"""LoRA: train a low-rank update of each chosen linear layer and freeze everything else.

    y = W x + b + (alpha / r) * B A dropout(x)          A: (r, in), B: (out, r), r << in, out

(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.) A is initialised as
nn.Linear's weight is (Kaiming-uniform, a = sqrt(5)) and B at zero, as peft does, so at step 0
the model IS the base model, bit for bit. Only A and B train: for a 7B model at rank 16 on all
seven linear layers of every block that is 40M parameters instead of 7.6B, and AdamW's state
shrinks with them, which is what brings 7B and 14B post-training onto one GPU. For RL it costs
little: policy-gradient runs with LoRA of rank 1-32 on all linear layers match full fine-tuning
when the learning rate is about 10x the full-fine-tuning one (Schulman et al., "LoRA Without
Regret", Thinking Machines, 2025).

The base weights keep their names, so a LoRA model still loads and saves as the base checkpoint
plus an adapter, and `disabled(model)` (adapters off) is the reference model of DPO, KTO and the
RL KL terms, with no second copy of the weights. On disk an adapter is a peft folder, loadable by
peft, transformers and vLLM:
    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...
checkpoint.load_model loads such a folder as its base with the adapters on top;
`python -m nanocausal.lora merge ADAPTER_FOLDER OUT_FOLDER` writes W + (alpha / r) B A as a full
Hugging Face folder.
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from nanocausal.model import Linear, Transformer
from nanocausal.safe_files import read_json, read_tensors

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a block's seven
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def target_layers(model, targets):
    """{name: Linear} of the model's linear layers whose last name is in targets (lm_head excluded)."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, Linear) and name.rsplit(".", 1)[-1] in targets and name != "lm_head"}
    found = {name.rsplit(".", 1)[-1] for name in layers}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"--lora-targets: the model has no linear layer named {missing[0]!r} "
                         f"(its blocks have {', '.join(TARGETS)})")
    return layers


def add_lora(model, rank, alpha=32.0, dropout=0.0, targets=TARGETS):
    """Freeze every parameter of the model and give each targeted Linear float32 adapters
    (A Kaiming-uniform, B zero); returns the model. model.lora records the settings."""
    if rank <= 0:
        raise ValueError(f"--lora-rank must be > 0, got {rank}")
    model.requires_grad_(False)
    device = model.embed_tokens.weight.device
    for m in target_layers(model, targets).values():
        m.lora_A = nn.Linear(m.in_features, rank, bias=False, device=device, dtype=torch.float32)
        m.lora_B = nn.Linear(rank, m.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(m.lora_B.weight)
        m.lora_scale = alpha / rank
        m.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        m.has_lora = True
    model.lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets)}
    return model


def is_lora_model(model):
    return getattr(model, "lora", None) is not None


@contextmanager
def disabled(model):
    """The base model, for the length of the block: every adapter is skipped (a no-op for a model
    without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.has_lora]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


# -----------------------------------------------------------------------------
# peft folders


def adapter_weights(model):
    """{peft's tensor name in adapter_model.safetensors: the adapter weight} of every adapted layer."""
    return {f"base_model.model.model.{name}.lora_{which}.weight": getattr(m, f"lora_{which}").weight
            for name, m in model.named_modules() if isinstance(m, Linear) and m.has_lora for which in "AB"}


def save_adapter(model, out_dir, base_model_name_or_path):
    """Write the adapters as a peft folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {key: weight.detach().contiguous().cpu() for key, weight in adapter_weights(model).items()}
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "init_lora_weights": True, "modules_to_save": None, **model.lora}
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(folder):
    """adapter_config.json, checked: a LORA adapter we can load, whose base is named by a string."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    config = read_json(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; nanocausal loads LORA adapters only")
    for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    if config.get("use_rslora") or config.get("use_dora") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: rsLoRA, DoRA and LoRA biases are not supported")
    base = config["base_model_name_or_path"]
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: base_model_name_or_path must name the base model (a folder or hub id), "
                         f"got {base!r}"[:300])
    targets = config["target_modules"]
    config["target_modules"] = [targets] if isinstance(targets, str) else list(targets)
    return config


def load_adapter(model, folder):
    """Add the adapters of a peft folder to `model` (its base) and load their weights; every tensor
    name and shape is checked against the model."""
    config = read_adapter_config(folder)
    add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config["target_modules"])
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS}")
    saved = {k.replace(".default.", "."): v for k, v in read_tensors(path).items()}
    expected = adapter_weights(model)
    for key, tensor in saved.items():
        if key not in expected:
            raise ValueError(f"{path}: tensor {key} matches no layer of the base model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)} but the base model expects "
                             f"{tuple(expected[key].shape)}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {key} holds {str(tensor.dtype).removeprefix('torch.')} values; an "
                             f"adapter weight must be a floating-point tensor")
        with torch.no_grad():
            expected[key].copy_(tensor)
    missing = sorted(expected.keys() - saved.keys())
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]}")
    return model


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight, W <- W + (alpha / r) B A, and remove the adapters:
    an ordinary model again (for export: the training copy keeps its adapters)."""
    for m in model.modules():
        if isinstance(m, Linear) and m.has_lora:
            m.weight.copy_(adapted_weight(m))
            del m.lora_A, m.lora_B, m.lora_dropout
            m.has_lora = False
    model.lora = None
    model.requires_grad_(True)
    return model


def adapted_weight(m):
    """m's weight with its adapter folded in, W + (alpha / r) B A, in float32."""
    return m.weight.float() + (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.lora_scale


@torch.no_grad()
def merged_for_generation(model, dtype=None):
    """A plain Transformer for generation (RL rollouts) whose adapted weights are W + (alpha / r) B A,
    every tensor in `dtype` (default: model.compute_dtype()). Why: unmerged, every adapted Linear of
    a bf16 base casts x to float32, runs A and B and casts back at every token: ~8 more small kernels
    per layer and target, ~1,570 per decode step of a 7B model with the seven targets.

    The adapted weights are new tensors; the others are the model's own where already in `dtype`,
    else copies (merged_copy_bytes). The caller frees it after generating (the adapters change at
    every optimiser step). It agrees with the adapted model up to one rounding of each merged
    weight to `dtype`."""
    dtype = dtype or model.compute_dtype()
    with torch.device("meta"):
        copy = Transformer(model.config)
    for name, p in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if ".lora_" in name:
            continue
        tensor = adapted_weight(module) if isinstance(module, Linear) and module.has_lora and attr == "weight" else p.detach()
        setattr(copy.get_submodule(module_name), attr, nn.Parameter(tensor.to(dtype), requires_grad=False))
    if model.config.tie_word_embeddings:
        copy.lm_head.weight = copy.embed_tokens.weight
    copy.reset_rope(model.embed_tokens.weight.device)
    return copy.eval()


def merged_copy_bytes(model, dtype):
    """The bytes merged_for_generation(model, dtype) allocates: the adapted weights, and every other
    weight not already in dtype (adapters themselves are left out)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * size for name, p in model.named_parameters() if ".lora_" not in name and (p.dtype != dtype or (
        name.endswith(".weight") and getattr(model.get_submodule(name.rpartition(".")[0]), "has_lora", False))))
