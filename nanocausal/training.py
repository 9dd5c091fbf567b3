"""
What every training script shares: per-token log-probs without a (batch x time x vocab) float32
tensor, the learning-rate schedule, checkpoints that resume exactly, and a JSONL metrics log.

The losses themselves live in losses.py as pure functions of the log-probs computed here.
"""

import json
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanocausal.model import Transformer, resolve_checkpoint

# -----------------------------------------------------------------------------
# Log-probs


def _chunk_logprobs(hidden, weight, targets, temperature, with_entropy=True):
    logits = F.linear(hidden, weight).float() / temperature  # (N, V): one chunk only
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:  # the entropy costs three more passes over (N, V), in forward and in the recompute
        return token_logprobs, None
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logprobs, entropy


def token_logprobs(model: Transformer, input_ids, attention_mask, completion_mask, temperature=1.0,
                   chunk_size=1024, hidden=None, return_entropy=False):
    """log p(input_ids[b, t] | input_ids[b, :t]) at every position where completion_mask is 1.

    input_ids, attention_mask, completion_mask: (B, T); completion_mask marks the target tokens
    (the completion, EOS included) and must be 0 at t = 0. Returns (B, T) float32 log-probs, zero
    off the mask (and the per-token entropy of the same distributions when return_entropy).

    Only the hidden states that predict a target token go through the output head, a chunk of
    `chunk_size` tokens at a time, and under autograd each chunk is recomputed in backward rather
    than stored: the float32 logits never exist for more than one chunk, whatever the batch. For a
    150k-token vocabulary this is what keeps long completions in memory (and skipping the prompt
    positions skips most of the head's FLOPs). `temperature` divides the logits, as the sampler
    does, so the log-probs are those of the distribution actually sampled from.
    `hidden` may be passed when the caller already ran `model.hidden_states` (e.g. for a value head).
    """
    if hidden is None:
        hidden = model.hidden_states(input_ids, attention_mask)
    targets_mask = completion_mask[:, 1:].bool()
    selected_hidden = hidden[:, :-1][targets_mask]  # (N, C): the states that predict a target
    targets = input_ids[:, 1:][targets_mask]  # (N,)
    weight = model.lm_head.weight
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, targets.numel(), chunk_size):
        args = (selected_hidden[start:start + chunk_size], weight, targets[start:start + chunk_size], temperature,
                return_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logprob_chunks.append(lp)
        if return_entropy:
            entropy_chunks.append(ent.detach())
    out = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    if targets.numel():
        out[:, 1:] = out[:, 1:].masked_scatter(targets_mask, torch.cat(logprob_chunks))
        if return_entropy:
            entropy[:, 1:] = entropy[:, 1:].masked_scatter(targets_mask, torch.cat(entropy_chunks))
    return (out, entropy) if return_entropy else out


def pad_batch(sequences, pad_id, masks=None, side="right"):
    """Stack lists of token ids into (B, T) ids and attention mask (+ the given masks, padded with 0)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), T, dtype=torch.long)
    padded_masks = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, seq in enumerate(sequences):
        where = slice(0, len(seq)) if side == "right" else slice(T - len(seq), T)
        ids[i, where] = torch.tensor(seq, dtype=torch.long)
        attention[i, where] = 1
        if masks is not None:
            padded_masks[i, where] = torch.tensor(masks[i], dtype=torch.long)
    return ids, attention, padded_masks


# -----------------------------------------------------------------------------
# Optimisation


def cosine_lr(step, total_steps, max_lr, warmup_steps=0, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices only (not on norms, biases), as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def autocast(device):
    """bf16 autocast on CUDA (weights stay in their dtype); nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# Checkpoints: a Hugging Face folder, plus trainer_state.pt to resume exactly

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json"]


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, model, tokenizer_source, optimizer=None, trainer_state=None, extra_modules=None):
    """Write out_dir as a Hugging Face folder (config, safetensors, tokenizer files) that
    `Transformer.from_pretrained` and transformers load, plus trainer_state.pt holding the
    optimiser, the step, the data position and every RNG state, so --resume continues exactly.

    The folder is written next to its final place and renamed into it, so an interrupted save
    never leaves a half-written checkpoint behind. extra_modules (e.g. a PPO value head) are
    saved as <name>.safetensors beside the model.
    """
    from safetensors.torch import save_file

    tmp_dir = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    source = resolve_checkpoint(tokenizer_source)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), tmp_dir)
    for name, module in (extra_modules or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  os.path.join(tmp_dir, f"{name}.safetensors"))
    if optimizer is not None or trainer_state is not None:
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "trainer_state": trainer_state or {}, "rng": rng_state()},
                   os.path.join(tmp_dir, "trainer_state.pt"))
    old_dir = out_dir.rstrip("/") + ".old"
    if os.path.isdir(out_dir):
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


def load_trainer_state(checkpoint_dir, optimizer=None):
    """Restore the optimiser and RNG states saved by save_checkpoint; return its trainer_state dict."""
    path = os.path.join(checkpoint_dir, "trainer_state.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint_dir} cannot be resumed: it has no trainer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    return saved["trainer_state"]


class MetricsLog:
    """Append one JSON object per step to a .jsonl file (flushed, so a crash loses nothing)."""

    def __init__(self, path, resume=False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a" if resume else "w")
        self.start = time.time()

    def log(self, **metrics):
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["time"] = round(time.time() - self.start, 3)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        return row
