"""Per-token log-probs of a batch of sequences, the quantity every loss in losses.py is a function of,
computed without ever materialising a (batch x time x vocab) float32 tensor.

    logprobs[b, t] = log softmax(lm_head(h[b, t-1]) / temperature)[input_ids[b, t]]

at the completion positions (the prompt is never a target). For a 150k-token vocabulary the full
float32 logits of one 1,500-token row are 0.9 GB; here only `chunk_size` of them exist at a time.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanocausal.model import Transformer


def _chunk_logprobs(hidden, weight, targets, temperature, with_entropy):
    logprobs = torch.log_softmax(F.linear(hidden, weight).float() / temperature, dim=-1)  # (N, V): one chunk only
    token_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    # the entropy costs three more passes over (N, V), in forward and in the recompute
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return token_logprobs, entropy


def token_logprobs(model: Transformer, input_ids, attention_mask, completion_mask, temperature=1.0,
                   chunk_size=1024, hidden=None, return_entropy=False, entropy_grad=False):
    """log p(input_ids[b, t] | input_ids[b, :t]) at every position where completion_mask is 1.

    input_ids, attention_mask, completion_mask: (B, T); completion_mask marks the target tokens
    (the completion, EOS included) and must be 0 at t = 0. Returns (B, T) float32 log-probs, zero
    off the mask (and the per-token entropy of the same distributions when return_entropy).

    Only the hidden states that predict a target go through the output head (skipping most of the
    prompt's FLOPs), `chunk_size` tokens at a time, each chunk recomputed in backward rather than
    stored. `temperature` divides the logits, as the sampler does. `hidden`: the caller's
    model.hidden_states output, when it already has it (e.g. for a value head).
    The entropy is detached unless entropy_grad (an entropy bonus in the loss differentiates it).
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
            entropy_chunks.append(ent if entropy_grad else ent.detach())
    out = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    if targets.numel():
        out[:, 1:] = out[:, 1:].masked_scatter(targets_mask, torch.cat(logprob_chunks))
        if return_entropy:
            entropy[:, 1:] = entropy[:, 1:].masked_scatter(targets_mask, torch.cat(entropy_chunks))
    return (out, entropy) if return_entropy else out


def sequence_logprobs(model: Transformer, input_ids, attention_mask, completion_mask):
    """log pi(completion | prompt) per row, (B,): the token log-probs summed over the completion
    (what DPO and KTO compare)."""
    return token_logprobs(model, input_ids, attention_mask, completion_mask).sum(-1)
