"""
Continuous batching: a fixed number of decode slots works through a queue of prompts, and a slot
whose completion has ended takes the next waiting prompt while the other slots go on decoding.

Why. A static batch (sampling.generate) decodes until its longest row ends. Replies of reasoning
models have a long tail of lengths, so in a static batch most rows ended long ago and compute
padding. Here a finished row is refilled at once: until the queue runs dry, every row of every
step computes a useful token (up to `check_every` steps of waiting, below).

The cache of a slot (R slots, C columns per layer, (R, K, C, D) tensors):

    column:   0 ......... L-1 | L .... L+t-1 | ........ | C-1
    slot s:   p p p p p p p p | t0 t1 ...    |  unused  | scratch
              its prompt       its new tokens (column = position)

Each slot keeps its own position: column j of a slot holds its token at position j, so slots
need not agree on anything: prompts of any length, completions at any point. model.hidden_states
writes a step's keys and values at one column for the whole batch (cache_position, (T,)), so a
step writes them at a scratch column (the last one attended, which no slot holds a token in) and
then moves each row's pair to its own column: one (R, K, D) index_put per layer. The attention
mask (R, C) is 1 on a row's columns 0 .. position-1; the scratch is the query's own slot, which
hidden_states always lets a query see. Keys may sit in any column: a key's position is in its
RoPE rotation (applied before it is cached), and attention is a sum over keys.

Refill. Every `check_every` steps (a host sync) the slots that finished hand their completion
back and waiting prompts are admitted, in input order. A prompt comes with its num_samples
samples (a GRPO group): it waits until num_samples slots are free, any of them. The prompts
admitted together are prefilled as one right-padded batch (so the padding, to the right of every
real token, is hidden by the causal mask), `prefill_chunk` tokens at a time (activation memory
stays bounded for long prompts), into a temporary cache whose keys and values are then copied into
each sample's slot: a prompt is read once per group. The logits of its last position give each
sample its first token. The other slots keep their state; they wait for the prefill and resume.

Static shapes. A decode step reads and writes preallocated tensors only (each slot's token,
position, completion column, token limit, random-stream key, the mask, the outputs) and admission
edits them in place, so on CUDA the step is captured as a CUDA graph per width bucket (the
columns in use rounded up to a multiple of sampling.GRAPH_BUCKET, scratch its last column) and
replayed across every refill; on CPU it runs eagerly over the columns in use.
A finished row keeps computing until it is refilled (shapes never change); what it computes is
never recorded: its position and column stop advancing.

Random numbers. Token t of sample j of prompt i is sampled (sampling.sample_tokens, inverse CDF)
with the uniform
    u = (h >> 8) / 2^24,   h = mix32(stream(seed, prompt_keys[i], j) + t * 0x9E3779B9 mod 2^32)
mix32 is lowbias32 (C. Wellons, "Hash function prospector", 2018), a bijective 32-bit
xorshift-multiply mixer; a Weyl sequence through a mixer is SplitMix's construction (Steele, Lea
and Flood, 2014). A draw is a pure function of its coordinates (a counter-based generator, as
Philox; Salmon et al., 2011), so a completion depends neither on its slot, its neighbours, the slot
count nor on how many processes share the prompts (each passes the global prompt_keys of its
share). One torch.Generator per row would give the same property at a kernel launch per row per
step; the hash is a few dozen integer ops on an (R,) tensor, with no state: safe in a CUDA graph.
All arithmetic stays below 2^63 in int64 (mul32 splits a 32 x 32-bit product), so no overflow.
u has 24 random bits, as torch.rand's float32 has. Streams are 32-bit: two of them coincide with
probability 2^-32 (correlated numbers for two rows, each still sampled from its exact distribution).
Sampled tokens differ from generate's (a torch.Generator over the batch) for the same seed;
greedy tokens are the same (up to the float rounding of a different batch shape, as between any
two batch shapes), and the log-probs follow sampling.py's conventions exactly.

Token limits. Prompt i gets min(max_new_tokens, context - len(prompt_i)) new tokens: a prompt
near the end of the context stops by "length" sooner instead of failing the whole call.

Left out: mixing prefill chunks into decode steps (vLLM's chunked prefill: the step would change
shape), sharing a prefix across prompts (prefix caching), paged KV memory (every slot reserves C
columns), and shrinking the batch once the queue is empty (the tail runs at full width).
"""

import secrets
from collections import deque

import torch

from nanocausal.sampling import (CudaGraphs, Generation, bucket_width, check_finite, check_generate_arguments,
                                 compute_dtype_weights, cpu_weight_layout, eos_id_list, sample_tokens)

# True runs the eager step at the widths the CUDA graphs use: every cache column (scratch C-1) for
# EAGER_ATTENDS_ALL_COLUMNS, the bucketed widths (sampling.bucket_width) for EAGER_USES_GRAPH_WIDTHS.
# The tests set them to check the graphs' arithmetic on CPU.
EAGER_ATTENDS_ALL_COLUMNS = False
EAGER_USES_GRAPH_WIDTHS = False

# -----------------------------------------------------------------------------
# Counter-based random numbers

MASK32 = 0xFFFFFFFF
WEYL32 = 0x9E3779B9  # 2^32 / golden ratio, odd: t -> t * WEYL32 visits every 32-bit value


def mul32(x, m):
    """(x * m) mod 2^32 for 0 <= x, m < 2^32, never above 2^49: int64 tensors or Python ints."""
    return ((x & 0xFFFF) * m + ((((x >> 16) * m) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32: a bijection of 32-bit values in which every input bit flips each output bit
    with probability close to 1/2."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed, prompt_key, sample):
    """The 32-bit key of one (prompt, sample) stream of random numbers (host side, Python ints)."""
    h = WEYL32
    for word in (seed & MASK32, (seed >> 32) & MASK32, prompt_key & MASK32, (prompt_key >> 32) & MASK32, sample):
        h = mix32(h ^ word)
    return h


def counter_uniform(stream, t):
    """The uniform in [0, 1) of draw t of each stream: (R,) int64 keys and counters -> (R,) float32."""
    h = mix32((stream + t * WEYL32) & MASK32)  # t < 2^30 (a token index): below 2^63
    return (h >> 8).float() * 2.0 ** -24


# -----------------------------------------------------------------------------
# The slots: static state, the decode step, admission


class Slots:
    """Everything the decode step reads and writes, allocated once for R slots, C cache columns and
    completions of up to N tokens. A free slot counts as finished."""

    def __init__(self, model, R, C, N, sampling, eos_ids, pad_token_id, vocab_size):
        config, device = model.config, model.embed_tokens.weight.device
        dtype = model.compute_dtype()  # bf16 under autocast (sampling.Decoder)
        K, D = config.num_key_value_heads, config.head_dim
        self.model, self.sampling, self.eos_ids = model, sampling, eos_ids  # sampling: (temperature, top_k, top_p)
        self.pad_token_id, self.vocab_size = pad_token_id, vocab_size
        shape = (R, K, C, D)
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
            k[self.rows, :, fed_at] = k[:, :, width - 1].clone()
            v[self.rows, :, fed_at] = v[:, :, width - 1].clone()
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
        ids = torch.zeros(G, P, dtype=torch.long)
        for g, p in enumerate(prompts):
            ids[g, :len(p)] = torch.tensor(p, dtype=torch.long)  # right-padded: real tokens never see the padding
        ids = ids.to(device)
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
        logits = check_finite(self.logits(torch.stack(last_hidden)))[owner]  # (G * n, V): each sample draws its own first token
        token, logprob = self.draw(logits, stream, torch.zeros_like(stream))
        self.tokens[slot_ids, 0] = token
        self.logprobs[slot_ids, 0] = logprob
        self.attention_mask[slot_ids] = (self.columns < L[:, None]).long()
        self.input_ids[slot_ids, 0] = token
        self.position[slot_ids, 0] = L
        self.column[slot_ids] = 1
        self.limit[slot_ids] = limit
        self.stream[slot_ids] = stream
        self.finished[slot_ids] = (token[:, None] == self.eos_ids).any(-1) | (limit <= 1)


class Stepper:
    """Runs Slots.step at a width: eagerly, or (CUDA) through one captured graph per width bucket
    (sampling.CudaGraphs), replayed across every refill."""

    def __init__(self, slots: Slots, use_cuda_graph):
        self.use_cuda_graph = use_cuda_graph
        self.run = CudaGraphs(slots.step, slots.rows.device) if use_cuda_graph else slots.step

    def __call__(self, width):
        return self.run(width)


# -----------------------------------------------------------------------------
# generate_many


def generate_many(model, prompts, max_new_tokens, slots=16, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
                  eos_token_ids=None, seed=None, vocab_size=None, pad_token_id=None, prompt_keys=None,
                  prefill_chunk=512, check_every=None, use_cuda_graph=None, on_prompt_done=None) -> Generation:
    """Continue each prompt (a list of token ids) with up to max_new_tokens tokens, `slots` rows at a
    time, a finished row taking the next waiting prompt. Returns what sampling.generate returns:
    rows in input order, prompt-major (row r continues prompts[r // num_samples]).

    slots: decode rows (at most len(prompts) * num_samples are allocated); >= num_samples.
    max_new_tokens: per prompt, capped by what the model's context leaves after it.
    seed: the run seed of the random streams (module docstring); None: a random one.
    prompt_keys: the index that keys each prompt's random numbers; default 0, 1, ... . A process
        given a share of a list passes its prompts' indices in the whole list, and samples what a
        single process would.
    prefill_chunk: tokens of each prompt per prefill forward pass (prompts admitted together share it).
    check_every: decode steps between refills (each a host sync); default 1 on CPU, 4 on CUDA.
    on_prompt_done: called as on_prompt_done(i, completions) as soon as every sample of prompts[i]
        has ended, with its num_samples completions (token-id lists, EOS included): a caller can
        save results while the rest decode (eval.py appends them to responses.jsonl).
    temperature, top_p, top_k, num_samples, eos_token_ids, vocab_size, pad_token_id,
    use_cuda_graph: as in sampling.generate.
    """
    config, device = model.config, model.embed_tokens.weight.device
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    eos_token_ids = eos_id_list(eos_token_ids)
    pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0)
    context = config.max_position_embeddings
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts if isinstance(prompts, (list, tuple)) else []):
        if len(prompt) >= context:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens: it fills the model's context of {context} "
                             f"(max_position_embeddings) and leaves no room for a new token")
    check_generate_arguments(config, prompts, 1, temperature, top_p, top_k, num_samples, vocab_size)
    if slots < num_samples:
        raise ValueError(f"slots ({slots}) must be >= num_samples ({num_samples}): a group is decoded together")
    prompt_keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(prompt_keys) != len(prompts) or min(prompt_keys) < 0:
        raise ValueError(f"prompt_keys must hold one int >= 0 per prompt ({len(prompts)}), got {len(prompt_keys)}")
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on CUDA, not {device}")
    check_every = check_every or (4 if device.type == "cuda" else 1)
    if seed is None:
        seed = secrets.randbits(63)  # not from torch's global RNG, which stays untouched

    n = num_samples
    limits = [min(max_new_tokens, context - len(p)) for p in prompts]
    C = max(len(p) + limit for p, limit in zip(prompts, limits))  # last column: the scratch
    eos_ids = torch.tensor(eos_token_ids or [-1], dtype=torch.long, device=device)  # -1 matches nothing
    with torch.inference_mode(), compute_dtype_weights(model), cpu_weight_layout(model):
        state = Slots(model, min(slots, len(prompts) * n), C, max(limits), (temperature, top_k, top_p), eos_ids,
                      pad_token_id, vocab_size)
        done = serve(state, prompts, n, limits, [[stream_key(seed, key, j) for j in range(n)] for key in prompt_keys],
                     prefill_chunk, check_every, Stepper(state, use_cuda_graph), on_prompt_done)

    # Ordinary tensors (not inference-mode ones), so a training step may use them.
    lengths = torch.tensor([len(tokens) for tokens, _ in done])
    width = int(lengths.max())
    tokens = torch.full((len(done), width), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(len(done), width, dtype=torch.float32)
    for r, (row_tokens, row_logprobs) in enumerate(done):
        tokens[r, :len(row_tokens)] = row_tokens
        logprobs[r, :len(row_tokens)] = row_logprobs
    eos = set(eos_token_ids)
    return Generation(
        tokens=tokens.to(device),
        logprobs=logprobs.to(device),
        completion_mask=(torch.arange(width)[None] < lengths[:, None]).long().to(device),
        lengths=lengths.to(device),
        stop_reason=["eos" if int(row[-1]) in eos else "length" for row, _ in done],
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),
    )


def serve(state: Slots, prompts, n, limits, streams, prefill_chunk, check_every, step, on_prompt_done=None):
    """The host loop: admit, decode `check_every` steps, hand back finished rows, refill; until the
    queue is empty and every slot has finished. Returns (tokens, logprobs) CPU tensors per output row."""
    R = state.rows.numel()
    waiting, free = deque(range(len(prompts))), list(range(R))
    done = [None] * (len(prompts) * n)
    samples_left = [n] * len(prompts)
    busy = {}  # slot -> (output row, prompt length, limit, step count when admitted)
    steps = 0
    graph_widths = step.use_cuda_graph or EAGER_USES_GRAPH_WIDTHS
    while True:
        admitted, admitted_slots, admitted_streams = [], [], []
        while waiting and len(free) >= n:  # admit every group that fits, with one prefill
            i = waiting.popleft()
            taken, free = free[:n], free[n:]
            admitted.append(i)
            admitted_slots += taken
            admitted_streams += streams[i]
            busy.update({s: (i * n + j, len(prompts[i]), limits[i], steps) for j, s in enumerate(taken)})
        if admitted:
            state.admit([prompts[i] for i in admitted], admitted_slots, [limits[i] for i in admitted], admitted_streams,
                        prefill_chunk)

        finished = state.finished.tolist()  # the host sync of a refill
        ended = sorted(s for s in busy if finished[s])
        if ended:
            index = torch.tensor(ended, device=state.rows.device)
            lengths = state.column[index].tolist()
            tokens, logprobs = state.tokens[index].cpu(), state.logprobs[index].cpu()
            for j, s in enumerate(ended):
                row = busy.pop(s)[0]
                done[row] = (tokens[j, :lengths[j]], logprobs[j, :lengths[j]])
                samples_left[row // n] -= 1
                if on_prompt_done is not None and samples_left[row // n] == 0:
                    i = row // n
                    on_prompt_done(i, [done[i * n + k][0].tolist() for k in range(n)])
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
            if EAGER_ATTENDS_ALL_COLUMNS:
                width = state.columns.numel()
            elif graph_widths:  # one graph per bucket: the width rounded up
                width = bucket_width(width, state.columns.numel())
            step(width)
            steps += 1
