"""
Generation by continuous batching: a fixed number of decode rows (slots) works through a queue of
prompts, and a slot whose completion has ended takes the next waiting prompt while the other slots
go on decoding. What eval.py and the RL rollouts run, with the log-prob of every sampled token.
Why: a static batch decodes until its longest row ends, and replies of reasoning models have a long
tail of lengths, so most of its rows would compute padding.

The cache of a slot (R slots, C columns per layer, (R, K, C, D) tensors):

    column:   0 ......... L-1 | L .... L+t-1 | ........ | C-1
    slot s:   p p p p p p p p | t0 t1 ...    |  unused  | scratch
              its prompt       its new tokens (column = position)

Column j of a slot holds its token at position j, so slots need not agree on anything: prompts of
any length, completions at any point. model.hidden_states writes a step's keys and values at one
column for the whole batch (cache_position, (T,)), so a step writes them at a scratch column (the
last one attended, where no slot holds a token) and then moves each row's pair to its own column:
one (R, K, D) index_put per layer. The attention mask (R, C) is 1 on a row's columns 0 ..
position-1; the scratch is the query's own slot, which hidden_states always lets a query see. Keys
may sit in any column: a key's position is in its RoPE rotation (applied before it is cached), and
attention is a sum over keys.

Refill. Every `check_every` steps (a host sync) the finished slots hand their completion back
and waiting prompts are admitted, in input order, each when num_samples slots are free (its GRPO
group). The prompts admitted together are prefilled as one right-padded batch, `prefill_chunk`
tokens at a time, into a temporary cache then copied into each sample's slot: a prompt is read
once per group, and the logits of its last position give each sample its first token.

Static shapes. A decode step reads and writes preallocated tensors only (Slots) and admission
edits them in place, so on CUDA the step is captured as a CUDA graph per width bucket (CudaGraphs)
and replayed across every refill; on CPU it runs eagerly over the columns in use. A finished row
keeps computing until it is refilled, but its position and column stop advancing, so nothing it
computes is recorded.

Sampling: token t of sample j of prompt i draws counter_uniform(stream_key(seed, prompt_keys[i],
j), t) (sampling.py), so a completion depends neither on its slot, its neighbours nor the slot count.

Left out: mixing prefill chunks into decode steps (vLLM's chunked prefill: the step would change
shape), sharing a prefix across prompts (prefix caching), paged KV memory (every slot reserves C
columns), and shrinking the batch once the queue is empty (the tail runs at full width).
"""

import functools
import numbers
import secrets
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from nanocausal.model import Linear
from nanocausal.sampling import counter_uniform, sample_tokens, stream_key


@dataclass
class Generation:
    """The completions of a batch: R = len(prompts) * num_samples rows, N columns.

    Row r continues prompt prompt_index[r] = r // num_samples (the samples of a prompt are
    contiguous: a GRPO group). N is the longest completion (<= max_new_tokens).
    """
    tokens: torch.Tensor  # (R, N) long: completion ids; pad_token_id after the completion
    logprobs: torch.Tensor  # (R, N) float32: log-prob of each token (sampling.py's conventions); 0 off the mask
    completion_mask: torch.Tensor  # (R, N) long: 1 up to and including the first EOS, 0 after
    lengths: torch.Tensor  # (R,) long: completion_mask.sum(1), EOS included
    stop_reason: list  # R strings: "eos" (emitted an EOS) or "length" (hit max_new_tokens)
    prompt_index: torch.Tensor  # (R,) long: which prompt each row continues
    stats: dict = field(default_factory=dict)  # capture_seconds: {width: seconds} of each CUDA graph captured

    def completions(self) -> list[list[int]]:
        """The completion ids of each row as plain lists (EOS included when there is one)."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.tolist())]


# -----------------------------------------------------------------------------
# The weights a call reads


@contextmanager
def cpu_weight_layout(model):
    """On CPU, give every Linear an (in, out) copy of its weight (model.Linear's weight_t) for the
    length of a generate call: one pass over the weights per call, twice their memory until it ends."""
    on_cpu = model.embed_tokens.weight.device.type == "cpu"
    linears = [m for m in model.modules() if isinstance(m, Linear)] if on_cpu else []
    for m in linears:
        m.weight_t = m.weight.detach().t().contiguous()
    try:
        yield
    finally:
        for m in linears:
            m.weight_t = None


@contextmanager
def compute_dtype_weights(model):
    """For the length of a generate call, read every floating parameter not in the compute dtype
    (model.compute_dtype(): bf16 under autocast with float32 weights) from a copy in that dtype.

    Why: under inference_mode autocast keeps no cache of its weight casts, so every decode step
    would read 4 bytes and write 2 per parameter before the matmul reads 2: 8 bytes per parameter
    per token where decoding is bound by the 2 it needs. The copies live on the model
    (model.compute_dtype_copies: not parameters, so no optimiser, checkpoint or .to() sees them) and
    are refreshed in place when a call starts (weights only change between calls), so no call
    allocates them again. Cost: 2 bytes per parameter for the
    model's life (memory_plan's rollout_copy)."""
    dtype = model.compute_dtype()
    swapped = []
    if model.embed_tokens.weight.dtype != dtype:
        copies = model.__dict__.setdefault("compute_dtype_copies", {})  # id(p) -> (p, copy)
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
# CUDA graphs, one per width bucket

# A graph attends over a multiple of this many columns, not over prompt + max_new_tokens from the
# first step (replies that end near 2k of an 8k budget would mostly read empty columns).
GRAPH_BUCKET = 512


def bucket_width(needed, full):
    """`needed` columns rounded up to a multiple of GRAPH_BUCKET, at most `full`; the extra columns
    are masked, so any width >= needed computes the same step."""
    return min(full, -(-needed // GRAPH_BUCKET) * GRAPH_BUCKET)


class CudaGraphs:
    """One CUDA graph of step(width) per width, captured on first use, all sharing one memory pool:
    safe in any replay order, since a step's temporaries die inside it and its results go to the
    Slots' tensors, allocated before any capture.

    A call runs one real step: a replay, or for a new width one eager step on a side stream (capture
    needs cuBLAS and the allocator warm) and the capture, which records kernels without running
    them; capture_seconds[width] times both. All on `device` (--device cuda:1 must not capture on
    device 0). The graphs live for one generate call: kept, they would hold the KV cache through the
    training phase, whose memory the plan gives to gradients and activations."""

    def __init__(self, step, device):
        self.step, self.device = step, torch.device(device)
        self.graphs, self.pool, self.capture_seconds = {}, None, {}

    def __call__(self, width):
        with torch.cuda.device(self.device):
            graph = self.graphs.get(width)
            if graph is not None:
                return graph.replay()
            start = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(width)
            torch.cuda.current_stream().wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = self.graphs[width] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(width)
            torch.cuda.synchronize(self.device)
            self.capture_seconds[width] = time.perf_counter() - start


# -----------------------------------------------------------------------------
# The slots: static state, the decode step, admission


class Slots:
    """Everything the decode step reads and writes, allocated once for R slots, C cache columns and
    completions of up to N tokens. A free slot counts as finished."""

    def __init__(self, model, R, C, N, sampling, eos_ids, pad_token_id, vocab_size):
        config, device = model.config, model.embed_tokens.weight.device
        dtype = model.compute_dtype()  # bf16 under autocast: the cache is read every step, at half the bytes
        self.model, self.sampling, self.eos_ids = model, sampling, eos_ids  # sampling: (temperature, top_k, top_p)
        self.pad_token_id, self.vocab_size = pad_token_id, vocab_size
        shape = (R, config.num_key_value_heads, C, config.head_dim)
        self.kv_cache = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                         for _ in range(config.num_hidden_layers)]
        self.attention_mask = torch.zeros(R, C, dtype=torch.long, device=device)  # 1 on the columns a row attends to
        self.input_ids = torch.zeros(R, 1, dtype=torch.long, device=device)  # the token fed next
        self.position = torch.zeros(R, 1, dtype=torch.long, device=device)  # its position = its cache column
        self.column = torch.zeros(R, dtype=torch.long, device=device)  # completion index of the next sampled token
        self.limit = torch.ones(R, dtype=torch.long, device=device)  # the row's max new tokens
        self.stream = torch.zeros(R, dtype=torch.long, device=device)  # its random-stream key
        self.finished = torch.ones(R, dtype=torch.bool, device=device)
        # Column N takes what a row that ended by length computes while it waits to be refilled.
        self.tokens = torch.full((R, N + 1), pad_token_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(R, N + 1, dtype=torch.float32, device=device)
        self.rows, self.columns = torch.arange(R, device=device), torch.arange(C, device=device)

    def logits(self, hidden):
        logits = self.model.lm_head(hidden).float()
        if self.vocab_size < logits.shape[-1]:
            logits[:, self.vocab_size:] = float("-inf")  # padded embedding rows: never sampled
        return logits

    def draw(self, logits, stream, t):
        temperature, top_k, top_p = self.sampling
        uniform = counter_uniform(stream, t) if temperature > 0 else None  # greedy draws nothing
        return sample_tokens(logits, temperature, top_k, top_p, uniform=uniform)

    def step(self, width):
        """One decode step over the first `width` cache columns (column width-1 is the scratch);
        advances every live row in place. No host synchronisation: a CUDA graph can replay it."""
        kv_cache = [(k[:, :, :width], v[:, :, :width]) for k, v in self.kv_cache]  # views: writes land in the cache
        hidden = self.model.hidden_states(self.input_ids, self.attention_mask[:, :width], self.position, kv_cache,
                                          self.columns[width - 1:width])
        alive = ~self.finished
        fed_at = self.position[:, 0]
        for k, v in kv_cache:  # from the scratch column to each row's own (clone: the two may be one column)
            k[self.rows, :, fed_at] = k[:, :, -1].clone()  # -1: column width-1 (an int index would
            v[self.rows, :, fed_at] = v[:, :, -1].clone()  # make torch.compile specialise on the width)
        self.attention_mask.scatter_(1, self.position, alive.long()[:, None])  # a dead row's column stays hidden
        self.position += alive.long()[:, None]

        token, logprob = self.draw(self.logits(hidden[:, -1]), self.stream, self.column)
        token = torch.where(alive, token, self.pad_token_id)
        self.tokens.scatter_(1, self.column[:, None], token[:, None])
        self.logprobs.scatter_(1, self.column[:, None], torch.where(alive, logprob, 0.0)[:, None])
        self.column += alive.long()
        self.finished |= (token[:, None] == self.eos_ids).any(-1) | (self.column >= self.limit)
        self.input_ids.copy_(token[:, None])

    def admit(self, prompts, slots, limits, streams, prefill_chunk):
        """Prefill G prompts once and start their n samples each in `slots` (G * n slot ids, group-major),
        with the given token limits (G,) and stream keys (G * n,)."""
        model, device = self.model, self.rows.device
        G, n = len(prompts), len(slots) // len(prompts)
        lengths = [len(p) for p in prompts]
        P = max(lengths)
        # right-padded: real tokens never see the padding
        ids = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True).to(device)
        # zeros, not empty: columns not written yet are masked, but 0 * NaN would still be NaN
        cache = [(torch.zeros_like(k[:G, :, :P]), torch.zeros_like(v[:G, :, :P])) for k, v in self.kv_cache]
        last_hidden = [None] * G
        for start in range(0, P, prefill_chunk):
            end = min(start + prefill_chunk, P)
            cols = torch.arange(start, end, device=device)
            hidden = model.hidden_states(ids[:, start:end], None, cols.expand(G, -1), cache, cols)  # causal mask
            for g, L in enumerate(lengths):
                if start <= L - 1 < start + prefill_chunk:
                    last_hidden[g] = hidden[g, L - 1 - start]
        owner = torch.arange(G, device=device).repeat_interleave(n)  # the group of each admitted slot
        slot_ids = torch.tensor(slots, device=device)
        for (k, v), (prefill_k, prefill_v) in zip(self.kv_cache, cache):  # columns past a prompt: masked garbage
            k[slot_ids, :, :P] = prefill_k[owner]
            v[slot_ids, :, :P] = prefill_v[owner]
        del cache

        L = torch.tensor(lengths, device=device)[owner]
        limit = torch.tensor(limits, device=device)[owner]
        stream = torch.tensor(streams, dtype=torch.long, device=device)
        logits = self.logits(torch.stack(last_hidden))
        if not torch.isfinite(logits.amax(-1)).all():  # a NaN anywhere makes its row's max NaN; one host sync per prefill
            raise ValueError("the model's logits are NaN or inf: its weights are broken (a diverged run?); "
                             "nothing can be sampled from it")
        token, logprob = self.draw(logits[owner], stream, torch.zeros_like(stream))  # each sample its own first token
        self.tokens[slot_ids, 0] = token
        self.logprobs[slot_ids, 0] = logprob
        self.attention_mask[slot_ids] = (self.columns < L[:, None]).long()
        self.input_ids[slot_ids, 0] = token
        self.position[slot_ids, 0] = L
        self.column[slot_ids] = 1
        self.limit[slot_ids] = limit
        self.stream[slot_ids] = stream
        self.finished[slot_ids] = (token[:, None] == self.eos_ids).any(-1) | (limit <= 1)


@functools.cache
def compiled_decode_step():
    """torch.compile of Slots.step, made once per process: dynamo guards on the Slots' tensor
    shapes and sampling settings, not on the object, so every later call (each RL step's rollouts)
    reuses the compiled code; dynamic shapes, so one compilation serves every width."""
    return torch.compile(Slots.step, dynamic=True)


# -----------------------------------------------------------------------------
# generate_many


def generate_many(model, prompts, max_new_tokens, slots=16, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
                  eos_token_ids=None, seed=None, vocab_size=None, pad_token_id=None, prompt_keys=None,
                  prefill_chunk=512, check_every=None, use_cuda_graph=None, on_prompt_done=None, widths=None,
                  compile_decode=False) -> Generation:
    """Continue each prompt (a list of token ids) with up to max_new_tokens tokens, `slots` rows at a
    time. Returns the rows prompt-major, in input order (row r continues prompts[r // num_samples]).

    slots: decode rows, >= num_samples (at most len(prompts) * num_samples are allocated).
    max_new_tokens: per prompt, capped by what the model's context leaves after it (a prompt near
        the end of the context stops by "length" sooner instead of failing the call).
    temperature: 0 is greedy; top_k: 0 keeps all ids; top_p: 1 keeps all ids (sampling.py).
    num_samples: completions per prompt (a GRPO group), decoded from one prefill of the prompt.
    eos_token_ids: an id or ids that end a completion (included in it); None: none.
    seed: the run seed of the random streams (sampling.py); None: a random one (torch's global RNG
        is never touched).
    vocab_size: ids >= vocab_size are never sampled (the tokenizer's vocabulary when the
        checkpoint pads its embedding, as Qwen's do); default: the model's.
    pad_token_id: fills tokens after a completion; default: the first EOS id, else 0.
    prompt_keys: the index that keys each prompt's random numbers; default 0, 1, ... (a process given
        a share of a list passes its prompts' indices in the whole list: it samples what one would).
    prefill_chunk: tokens of each prompt per prefill forward pass (prompts admitted together share it).
    check_every: decode steps between refills (each a host sync); default 1 on CPU, 4 on CUDA.
    use_cuda_graph: capture the decode step as CUDA graphs; default: when the model is on CUDA.
    on_prompt_done: called as on_prompt_done(i, completions) once every sample of prompts[i] has
        ended, with its num_samples token-id lists (eval.py saves them while the rest decode).
    widths: the cache columns a decode step attends over: "used" (eager default) or "bucket"
        (bucket_width: what CUDA graphs run). Masked columns change nothing in exact arithmetic, but
        bf16 sums of other lengths round differently: compare graphs with eager at "bucket".
    compile_decode: torch.compile the decode step before any CUDA-graph capture (fewer, fused
        kernels per step: gpt-fast's route).
    """
    config, device = model.config, model.embed_tokens.weight.device
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if isinstance(eos_token_ids, numbers.Integral):
        eos_token_ids = [eos_token_ids]
    eos_token_ids = [int(i) for i in eos_token_ids or []]
    pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0)
    check_arguments(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, vocab_size, slots)
    prompt_keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(prompt_keys) != len(prompts) or min(prompt_keys) < 0:
        raise ValueError(f"prompt_keys must hold one int >= 0 per prompt ({len(prompts)}), got {len(prompt_keys)}")
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on CUDA, not {device}")
    widths = widths or ("bucket" if use_cuda_graph else "used")
    if widths not in ("used", "bucket") or (use_cuda_graph and widths != "bucket"):
        raise ValueError(f"widths must be 'used' or 'bucket' ('bucket' with CUDA graphs: one graph per width), "
                         f"got {widths!r}")
    check_every = check_every or (4 if device.type == "cuda" else 1)
    seed = secrets.randbits(63) if seed is None else seed

    n, context = num_samples, config.max_position_embeddings
    limits = [min(max_new_tokens, context - len(p)) for p in prompts]
    C = max(len(p) + limit for p, limit in zip(prompts, limits))  # last column: the scratch
    eos_ids = torch.tensor(eos_token_ids or [-1], dtype=torch.long, device=device)  # -1 matches nothing
    with torch.inference_mode(), compute_dtype_weights(model), cpu_weight_layout(model):
        state = Slots(model, min(slots, len(prompts) * n), C, max(limits), (temperature, top_k, top_p), eos_ids,
                      pad_token_id, vocab_size)
        step = functools.partial(compiled_decode_step(), state) if compile_decode else state.step
        step = CudaGraphs(step, device) if use_cuda_graph else step
        done = serve(state, prompts, n, limits, [[stream_key(seed, key, j) for j in range(n)] for key in prompt_keys],
                     prefill_chunk, check_every, step, widths == "bucket", on_prompt_done)

    # Ordinary tensors (not inference-mode ones), so a training step may use them.
    lengths = torch.tensor([len(tokens) for tokens, _ in done])
    tokens = pad_sequence([tokens for tokens, _ in done], batch_first=True, padding_value=pad_token_id)
    logprobs = pad_sequence([logprobs for _, logprobs in done], batch_first=True, padding_value=0.0)
    return Generation(
        tokens=tokens.to(device),
        logprobs=logprobs.to(device),
        completion_mask=(torch.arange(tokens.shape[1])[None] < lengths[:, None]).long().to(device),
        lengths=lengths.to(device),
        stop_reason=["eos" if int(row[-1]) in eos_token_ids else "length" for row, _ in done],
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),
        stats={"capture_seconds": dict(getattr(step, "capture_seconds", {}))},
    )


def serve(state: Slots, prompts, n, limits, streams, prefill_chunk, check_every, step, bucketed, on_prompt_done=None):
    """The host loop: admit, decode `check_every` steps (at bucket widths if `bucketed`), hand back
    finished rows; until the queue is empty and every slot has finished. Returns (tokens, logprobs)
    CPU tensors per output row."""
    waiting, free = deque(range(len(prompts))), list(range(state.rows.numel()))
    done = [None] * (len(prompts) * n)
    busy = {}  # slot -> (output row, prompt length, limit, step count when admitted)
    steps = 0
    while True:
        admitted, admitted_slots = [], []
        while waiting and len(free) >= n:  # admit every group that fits, with one prefill
            i = waiting.popleft()
            taken, free = free[:n], free[n:]
            admitted.append(i)
            admitted_slots += taken
            busy.update({s: (i * n + j, len(prompts[i]), limits[i], steps) for j, s in enumerate(taken)})
        if admitted:
            state.admit([prompts[i] for i in admitted], admitted_slots, [limits[i] for i in admitted],
                        [key for i in admitted for key in streams[i]], prefill_chunk)

        finished = state.finished.tolist()  # the host sync of a refill
        ended = sorted(s for s in busy if finished[s])
        if ended:
            index = torch.tensor(ended, device=state.rows.device)
            lengths = state.column[index].tolist()
            tokens, logprobs = state.tokens[index].cpu(), state.logprobs[index].cpu()
            for j, s in enumerate(ended):
                row = busy.pop(s)[0]
                done[row] = (tokens[j, :lengths[j]], logprobs[j, :lengths[j]])
                i = row // n
                group = done[i * n:(i + 1) * n]
                if on_prompt_done is not None and None not in group:  # its last sample just ended
                    on_prompt_done(i, [ids.tolist() for ids, _ in group])
            state.position[index] = 0  # a free row's position stays within any width
            free = sorted(free + ended)
        if not busy and not waiting:
            return done
        if not busy or (waiting and len(free) >= n):
            continue  # refill before decoding
        for _ in range(check_every):
            # attend over the columns in use: up to the highest position a row may have reached (its
            # column is then the scratch, or one beyond every row's: both are safe, Slots.step)
            width = 1 + max(min(L + steps - admitted, L + limit - 1) for _, L, limit, admitted in busy.values())
            if bucketed:
                width = bucket_width(width, state.columns.numel())
            step(width)
            steps += 1


def check_arguments(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples, vocab_size, slots):
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
    if slots < num_samples:
        raise ValueError(f"slots ({slots}) must be >= num_samples ({num_samples}): a group is decoded together")
    if not 0 < vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} must be in 1..{config.vocab_size} (the model's output size)")
    context = config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if len(prompt) >= context:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens: it fills the model's context of {context} "
                             f"(max_position_embeddings) and leaves no room for a new token")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompts[{i}] holds an id outside 0..{config.vocab_size - 1}")
