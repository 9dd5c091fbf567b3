"""
Batched generation with a static KV cache: the rollouts of RL post-training, with the log-prob of
every sampled token.

How a batch is generated (R = B * num_samples rows, P = longest prompt, N = max_new_tokens):

    cache slot:   0 ........ P-1 | P ........ P+N-2
    row 0:        pad pad p p p p | t0 t1 t2 ...       prompts are left-padded to P, so every row
    row 1:        p p p p p p p p | t0 t1 t2 ...       writes its t-th new token at slot P + t

1. Prefill. The B prompts go through the model once, left-padded, filling a (B, K, P, D) cache
   per layer; only the last position goes through the output head (a 150k-token head over every
   prompt position would cost more than the whole decode). With num_samples > 1 each prompt's
   cache is then copied into its num_samples rows (the GRPO group): the prompt is read once.
2. Decode. One token per row per step. Every shape is fixed in advance: the cache is
   (R, K, P + N, D), and the inputs of a step (the token, its position, its cache slot) live in
   preallocated tensors that the step itself advances in place. The step never asks the host
   anything, so on CUDA it is captured as a CUDA graph and replayed (no Python, no kernel-launch
   overhead): one graph per length bucket, attending over the slots in use rounded up to a
   multiple of GRAPH_BUCKET, so early steps do not read the empty end of the cache. On CPU the
   same function runs eagerly over exactly the slots in use. Whether every row has
   finished is checked (a host sync) only every `check_every` steps.

On CPU, for the length of a call, every linear layer multiplies by a transposed copy of its
weight (cpu_weight_layout, model.Linear): MKL handles the few rows of a decode step several times
faster in that layout.

Rows stop independently: a row that emitted an EOS keeps computing (shapes never change) but what
it produces afterwards is replaced by pad_token_id and masked out. A batch therefore costs its
longest row; for a queue of prompts whose replies differ much in length, nanocausal.refill keeps a
fixed number of rows busy instead (continuous batching: a finished row takes the next prompt).

Sampling. With z the logits (float32) of the ids below `vocab_size`:
    temperature > 0:  z' = filter_logits(z / temperature, top_k, top_p)   (-inf outside the support)
                      p  = softmax(z'),  token ~ p  by inverse CDF: the first id whose
                      cumulative probability exceeds u, u ~ Uniform(0, 1) per row (searched
                      block by block, see sample_tokens).
    temperature = 0:  token = argmax z (greedy).
Inverse-CDF sampling needs one random number per row (torch.multinomial and the
"argmax of p / Exponential(1)" trick draw one per vocabulary entry, which dominates a CPU step
at 150k ids) and, like the trick, no host synchronisation, so it can be captured in a graph.

Conventions of the returned log-probs (what the RL losses rely on):
- logprobs[r, t] = log p(token | prefix) under the distribution actually sampled from: after the
  temperature, top-k and top-p filtering (renormalised over the kept ids) and the vocab_size mask.
  With top_k = 0 and top_p = 1 this is log_softmax(z / temperature), which is exactly what
  training.token_logprobs(..., temperature=temperature) recomputes from the same tokens (up to
  the mass of ids >= vocab_size, which is zero when vocab_size is the model's).
- Greedy (temperature 0): the log-prob under the temperature-1 distribution, log_softmax(z)
  (over the ids below vocab_size, like the sampled case).
- 0 wherever completion_mask is 0.
"""

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nanocausal.model import Linear


@dataclass
class Generation:
    """The completions of a batch: R = len(prompts) * num_samples rows, N columns.

    Row r continues prompt prompt_index[r] = r // num_samples (the samples of a prompt are
    contiguous: a GRPO group). N is the longest completion (<= max_new_tokens).
    """
    tokens: torch.Tensor  # (R, N) long: completion ids; pad_token_id after the completion
    logprobs: torch.Tensor  # (R, N) float32: log-prob of each token (see the module docstring); 0 off the mask
    completion_mask: torch.Tensor  # (R, N) long: 1 up to and including the first EOS, 0 after
    lengths: torch.Tensor  # (R,) long: completion_mask.sum(1), EOS included
    stop_reason: list  # R strings: "eos" (emitted an EOS) or "length" (hit max_new_tokens)
    prompt_index: torch.Tensor  # (R,) long: which prompt each row continues

    def completions(self) -> list[list[int]]:
        """The completion ids of each row as plain lists (EOS included when there is one)."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.tolist())]


# -----------------------------------------------------------------------------
# Sampling one token per row


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top-k / top-p support; (R, V) float in, same out.

    top_k > 0 keeps the k largest logits of each row (ids tied with the k-th are kept too).
    top_p < 1 then keeps the smallest set of most likely ids whose probability (under the
    softmax of the top-k-filtered logits) reaches top_p: id i is kept when the probability of
    the ids strictly more likely than it is < top_p, so the most likely id is always kept.
    Order (temperature, then top-k, then top-p) and rule are those of transformers' warpers.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the ids ranked above
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits, temperature, top_k, top_p, generator=None, uniform=None):
    """One token per row from (R, V) float32 logits, and its log-prob (see the module docstring).

    The random number of each row is drawn from `generator`, or given as `uniform`: (R,) floats
    in [0, 1), one per row (nanocausal.refill derives them from a counter, so that a row's draws
    do not depend on its batch).

    Both modes start from w = exp(z - max z), the unnormalised probabilities, summed in blocks of
    `block` ids (block = gcd(V, 1024): 128 for Qwen's 151,936 ids). A cumulative sum over the
    blocks finds the block holding the token, and one over that block's ids finds the id: the same
    inverse CDF as a cumulative sum over all V ids, for one pass over the logits instead of three
    (softmax, cumsum, search), which is most of a small model's sampling time on CPU.
    log p(token) = z_token - max z - log(sum w). No host synchronisation: safe in a CUDA graph.
    """
    if temperature > 0:
        if temperature != 1.0:
            logits = logits / temperature
        logits = filter_logits(logits, top_k, top_p)
    R, V = logits.shape
    block = math.gcd(V, 1024)
    peak = logits.amax(-1, keepdim=True)
    weights = (logits - peak).exp_()  # the peak's weight is 1; filtered-out ids weigh 0
    block_sums = weights.view(R, V // block, block).sum(-1)
    block_cdf = block_sums.cumsum(-1)
    total = block_cdf[:, -1:]
    if temperature == 0:  # the first id equal to the peak: first its block, then its place in the block
        in_block = (logits.view(R, V // block, block).amax(-1) == peak).int().argmax(-1, keepdim=True)
        ids = in_block * block + torch.arange(block, device=logits.device)
        offset = (logits.gather(-1, ids) == peak).int().argmax(-1, keepdim=True)
    else:
        # u < total (strictly), so the first block whose cdf exceeds u holds some probability,
        # and the same clamp inside that block lands on an id of positive probability.
        if uniform is None:
            uniform = torch.rand(R, 1, device=logits.device, generator=generator)
        u = uniform.view(R, 1) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        in_block = torch.searchsorted(block_cdf, u, right=True)
        ids = in_block * block + torch.arange(block, device=logits.device)
        inner_cdf = weights.gather(-1, ids).cumsum(-1)
        within = (u - (block_cdf - block_sums).gather(-1, in_block)).clamp(min=0)
        within = torch.minimum(within, torch.nextafter(inner_cdf[:, -1:], torch.zeros_like(within)))
        offset = torch.searchsorted(inner_cdf, within, right=True)
    token = in_block * block + offset
    logprob = logits.gather(-1, token) - peak - total.log()
    return token.squeeze(-1), logprob.squeeze(-1)


@contextmanager
def cpu_weight_layout(model):
    """On CPU, give every Linear of the model an (in, out) copy of its weight for the length of a
    generate call (see model.Linear: decode steps multiply few rows, which MKL does several times
    faster in that layout). The copies cost one pass over the weights per call and double the
    weights' memory until the call ends. On other devices: nothing."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if model.embed_tokens.weight.device.type != "cpu":
        linears = []
    for m in linears:
        m.weight_t = m.weight.detach().t().contiguous()
    try:
        yield
    finally:
        for m in linears:
            m.weight_t = None


@contextmanager
def compute_dtype_weights(model):
    """For the length of a generate call, let every floating parameter of the model that is not in
    the compute dtype (model.compute_dtype(): bf16 under autocast with float32 master weights) be
    read from a copy in that dtype.

    Why: autocast casts a float32 weight to bf16 where a matmul reads it, and under inference_mode
    it keeps no cache of those casts, so every decode step (and every replay of a captured step)
    would read 4 bytes and write 2 per parameter before the matmul reads 2: 8 bytes per parameter
    per token where decoding is bound by the 2 it needs. The copies are made once and kept on the
    model (model.compute_dtype_copies, {id(parameter): (parameter, copy)}, not parameters: no optimiser,
    checkpoint or .to() ever sees them) and are refreshed in place when a call starts: the weights
    only change between calls (an optimiser step), one pass over them per call is nothing next to
    one per token, and the copies keep their addresses, so a CUDA graph captured over them stays
    valid. They cost 2 bytes per parameter for as long as the model lives (memory_plan's
    rollout_copy). Weights already in the compute dtype (--dtype bfloat16) are read as they are.
    """
    dtype = model.compute_dtype()
    swapped = []  # (module, name, the parameter to put back)
    if model.embed_tokens.weight.dtype != dtype:
        copies = model.__dict__.setdefault("compute_dtype_copies", {})  # id(parameter) -> (parameter, copy)
        refreshed = set()
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is None or not p.is_floating_point() or p.dtype == dtype:
                    continue
                source, copy = copies.get(id(p), (None, None))  # a tied head and its embedding: one copy
                if source is not p or copy.shape != p.shape or copy.dtype != dtype or copy.device != p.device:
                    copy = torch.empty_like(p, dtype=dtype, requires_grad=False)
                    copies[id(p)] = (p, copy)
                if id(p) not in refreshed:
                    copy.copy_(p.detach())
                    refreshed.add(id(p))
                module._parameters[name] = copy
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


# -----------------------------------------------------------------------------
# The decoder: static buffers and the one-token step


class Decoder:
    """Everything a decode step reads and writes, allocated once for R rows and S cache slots.

    step() feeds `input_ids` at cache slot `cache_position` (position `position_ids`), samples
    the next token of every row, records it in column `column` of the outputs, and advances all
    three counters in place: calling it again continues the generation. It touches no Python
    state, which is what lets a CUDA graph replay it.
    """

    def __init__(self, model, attention_mask, prompt_lengths, max_new_tokens, sampling, eos_ids, pad_token_id, vocab_size):
        R, S = attention_mask.shape
        config, device = model.config, attention_mask.device
        dtype = model.compute_dtype()  # bf16 under autocast: the cache is read every step, at half the bytes
        self.model, self.sampling, self.vocab_size, self.pad_token_id = model, sampling, vocab_size, pad_token_id
        self.kv_cache = [(torch.zeros(R, config.num_key_value_heads, S, config.head_dim, device=device, dtype=dtype),
                          torch.zeros(R, config.num_key_value_heads, S, config.head_dim, device=device, dtype=dtype))
                         for _ in range(config.num_hidden_layers)]
        self.attention_mask = attention_mask  # (R, S): 0 on left padding, 1 on prompts and new tokens
        self.prompt_slots = S - max_new_tokens  # P
        self.input_ids = torch.zeros(R, 1, dtype=torch.long, device=device)
        self.position_ids = prompt_lengths[:, None].clone()  # the first new token sits at position len(prompt)
        self.cache_position = torch.tensor([self.prompt_slots], device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.eos_ids = eos_ids  # (E,) long
        self.finished = torch.zeros(R, dtype=torch.bool, device=device)
        self.tokens = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
        self.completion_mask = torch.zeros(R, max_new_tokens, dtype=torch.long, device=device)

    def sample_and_record(self, logits):
        """Sample from (R, V) float32 logits, write column `column` of the outputs, advance `column`."""
        if self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size:] = float("-inf")  # padded embedding rows: never sampled
        token, logprob = sample_tokens(logits, *self.sampling)
        alive = ~self.finished
        token = torch.where(alive, token, self.pad_token_id)
        self.tokens.index_copy_(1, self.column, token[:, None])
        self.logprobs.index_copy_(1, self.column, torch.where(alive, logprob, 0.0)[:, None])
        self.completion_mask.index_copy_(1, self.column, alive.long()[:, None])  # the EOS itself is in
        self.finished |= (token[:, None] == self.eos_ids).any(-1)
        self.input_ids.copy_(token[:, None])
        self.column += 1

    def step(self, attend_slots=None):
        """One decode step over the first attend_slots slots of the cache (default: all S); slots
        beyond the current one are masked anyway, so any width that holds it computes the same."""
        slots = attend_slots or self.attention_mask.shape[1]
        kv_cache = [(k[:, :, :slots], v[:, :, :slots]) for k, v in self.kv_cache]  # views: writes land in the cache
        hidden = self.model.hidden_states(self.input_ids, self.attention_mask[:, :slots], self.position_ids,
                                          kv_cache, self.cache_position)
        self.sample_and_record(self.model.lm_head(hidden[:, -1]).float())
        self.position_ids += 1
        self.cache_position += 1

    def done(self) -> bool:
        return bool(self.finished.all())  # host sync: called every few steps only


# Cache columns per CUDA-graph length bucket: a graph attends over a multiple of this many slots,
# not over the whole prompt + max_new_tokens from the first step (replies that end near 2k of an
# 8k budget would otherwise mostly read empty slots).
GRAPH_BUCKET = 512
# True runs the eager CPU steps at the widths the graphs use (bucket_width): the tests set it.
EAGER_USES_GRAPH_WIDTHS = False


def bucket_width(needed, full, bucket=None):
    """The cache width a step that needs `needed` slots runs at under CUDA graphs: needed rounded
    up to a multiple of the bucket (GRAPH_BUCKET), at most `full`. Slots between needed and the
    width are masked, so any width >= needed computes the same step."""
    bucket = bucket or GRAPH_BUCKET
    return min(full, -(-needed // bucket) * bucket)


class CudaGraphs:
    """One captured CUDA graph of step(width) per width, captured on first use, sharing one memory
    pool. Sharing is safe in any replay order because a step's temporaries all die inside it: what
    it produces is written into tensors allocated before any capture (the Decoder's, the Slots').

    Calling it runs one real step: a replay, or (a width not seen yet) one eager step on a side
    stream (capture needs cuBLAS and the allocator warm) followed by the capture, which records
    kernels without running them. Streams, capture and replay live on `device` (--device cuda:1
    must not capture on device 0). The graphs live for one generate call: keeping them across
    calls would keep the static buffers they write, the whole KV cache among them, allocated
    through the training phase, which the memory plan gives to gradients and activations."""

    def __init__(self, step, device, generator=None):
        self.step, self.device, self.generator = step, torch.device(device), generator
        self.graphs, self.pool = {}, None

    def __call__(self, width):
        with torch.cuda.device(self.device):
            graph = self.graphs.get(width)
            if graph is not None:
                return graph.replay()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(width)
            torch.cuda.current_stream().wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = self.graphs[width] = torch.cuda.CUDAGraph()
            if self.generator is not None:
                graph.register_generator_state(self.generator)  # our own generator: each replay advances it
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(width)


def decode(decoder: Decoder, steps, check_every, use_cuda_graph, generator):
    """Run `steps` decode steps, stopping early once every row is finished; returns steps run.
    Step i writes slot P + i and needs the first P + i + 1 slots: eagerly it attends over exactly
    those; with CUDA graphs over bucket_width of them (one graph per bucket, switched as the
    position crosses a bucket)."""
    first_cache_slot, full = decoder.prompt_slots, decoder.attention_mask.shape[1]
    use_cuda_graph = use_cuda_graph and steps >= 2  # a graph pays off from the second step on
    run = CudaGraphs(decoder.step, decoder.input_ids.device, generator) if use_cuda_graph else decoder.step
    for i in range(steps):
        needed = first_cache_slot + i + 1
        run(bucket_width(needed, full) if use_cuda_graph or EAGER_USES_GRAPH_WIDTHS else needed)
        if (i + 1) % check_every == 0 and decoder.done():
            return i + 1
    return steps


# -----------------------------------------------------------------------------
# generate


def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
             eos_token_ids=None, seed=None, vocab_size=None, pad_token_id=None, check_every=8,
             use_cuda_graph=None) -> Generation:
    """Continue each prompt (a list of token ids) with up to max_new_tokens sampled tokens.

    temperature: 0 is greedy; top_k: 0 keeps all ids; top_p: 1 keeps all ids.
    num_samples: completions per prompt; rows r // num_samples == i continue prompts[i].
    eos_token_ids: an id or ids that end a completion (included in it); None: none.
    seed: seeds this call's own torch.Generator (the global RNG is untouched); None: random.
    vocab_size: ids >= vocab_size are never sampled (the tokenizer's vocabulary when the
        checkpoint pads its embedding, as Qwen's do); default: the model's.
    pad_token_id: fills tokens after a completion; default: the first EOS id, else 0.
    check_every: decode steps between checks that every row has finished (each is a host sync).
    use_cuda_graph: capture the decode step as a CUDA graph; default: when the model is on CUDA.
    """
    config = model.config
    device = model.embed_tokens.weight.device
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    eos_token_ids = eos_id_list(eos_token_ids)
    pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0)
    check_generate_arguments(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, vocab_size)
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on CUDA, not {device}")
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    sampling = (temperature, top_k, top_p, generator)

    with torch.inference_mode(), compute_dtype_weights(model), cpu_weight_layout(model):
        decoder, steps = prefill_and_decode(model, prompts, max_new_tokens, num_samples, sampling, eos_token_ids,
                                            pad_token_id, vocab_size, check_every, use_cuda_graph)

    # Tensors made under inference_mode can never enter autograd (a training forward that saves one
    # for backward raises); clones made out here are ordinary tensors.
    completion_mask = decoder.completion_mask[:, :steps + 1].clone()
    lengths = completion_mask.sum(1)
    width = int(lengths.max())
    ended_with_eos = decoder.finished.tolist()
    return Generation(
        tokens=decoder.tokens[:, :width].clone(),
        logprobs=decoder.logprobs[:, :width].clone(),
        completion_mask=completion_mask[:, :width],
        lengths=lengths,
        stop_reason=["eos" if eos else "length" for eos in ended_with_eos],
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(num_samples),
    )


def prefill_and_decode(model, prompts, max_new_tokens, num_samples, sampling, eos_token_ids, pad_token_id, vocab_size,
                       check_every, use_cuda_graph):
    """The work of generate (arguments already checked): returns the Decoder holding the outputs
    and the number of decode steps run."""
    config, device = model.config, model.embed_tokens.weight.device

    # Left-pad the prompts to P slots. A row's positions count its real tokens only.
    B, n, N = len(prompts), num_samples, max_new_tokens
    P = max(len(p) for p in prompts)
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    prompt_lengths = prompt_mask.sum(1)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)

    # The decode rows: prompt i's samples are rows i*n ... i*n + n-1.
    attention_mask = torch.ones(B * n, P + N, dtype=torch.long, device=device)
    attention_mask[:, :P] = prompt_mask.repeat_interleave(n, dim=0)
    eos_ids = torch.tensor(eos_token_ids or [-1], dtype=torch.long, device=device)  # -1 matches nothing
    decoder = Decoder(model, attention_mask, prompt_lengths.repeat_interleave(n), N, sampling, eos_ids,
                      pad_token_id, vocab_size)

    # 1. Prefill each prompt once into a P-slot cache, then copy it into its n rows of the big one.
    K, D = config.num_key_value_heads, config.head_dim
    dtype = model.compute_dtype()
    prefill_cache = [(torch.empty(B, K, P, D, device=device, dtype=dtype), torch.empty(B, K, P, D, device=device, dtype=dtype))
                     for _ in range(config.num_hidden_layers)]
    hidden = model.hidden_states(prompt_ids, prompt_mask, positions, prefill_cache, torch.arange(P, device=device))
    for (k, v), (prefill_k, prefill_v) in zip(decoder.kv_cache, prefill_cache):
        k.view(B, n, K, P + N, D)[:, :, :, :P].copy_(prefill_k[:, None])
        v.view(B, n, K, P + N, D)[:, :, :, :P].copy_(prefill_v[:, None])
    del prefill_cache
    last_logits = check_finite(model.lm_head(hidden[:, -1]).float())  # (B, V): every prompt's last token is at P-1
    decoder.sample_and_record(last_logits.repeat_interleave(n, dim=0))  # each sample draws its own first token

    # 2. Decode the other N - 1 tokens.
    steps = decode(decoder, N - 1, check_every, use_cuda_graph, sampling[-1])
    return decoder, steps


def eos_id_list(eos_token_ids) -> list[int]:
    """None, an id, or ids -> a list of ints."""
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, numbers.Integral):
        return [int(eos_token_ids)]
    return [int(i) for i in eos_token_ids]


def check_finite(logits):
    """The prompts' logits, or a clear error: NaN or inf logits (a diverged checkpoint) would otherwise
    sample out-of-range ids. Checked once per prefill (a host sync), never inside the decode loop."""
    if not torch.isfinite(logits.amax(-1)).all():  # a NaN anywhere in a row makes its max NaN
        raise ValueError("the model's logits are NaN or inf: its weights are broken (a diverged run?); "
                         "nothing can be sampled from it")
    return logits


def check_generate_arguments(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, vocab_size):
    """One clear ValueError per kind of bad input, before any work."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 < vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{config.vocab_size} (the model's output size)")
    context = config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if len(prompt) + max_new_tokens > context:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(prompt) + max_new_tokens} positions, beyond the model's context of {context} "
                             f"(max_position_embeddings)")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompts[{i}] holds an id outside 0..{config.vocab_size - 1}")
