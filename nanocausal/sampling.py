"""
The per-token maths of generation (nanocausal.generate): one token per row from its logits, its
log-prob, and the counter-based random numbers that make a sample independent of its batch.

Sampling. With z the logits (float32) of the ids below `vocab_size`:
    temperature > 0:  z' = filter_logits(z / temperature, top_k, top_p)   (-inf outside the support)
                      p  = softmax(z'),  token ~ p  by inverse CDF: the first id whose
                      cumulative probability exceeds u, u ~ Uniform(0, 1) per row.
    temperature = 0:  token = argmax z (greedy).
Inverse-CDF sampling draws one random number per row (torch.multinomial and the "argmax of
p / Exponential(1)" trick draw one per vocabulary entry, which dominates a CPU step at 150k ids)
and needs no host synchronisation, so a CUDA graph can capture it.

Conventions of the returned log-probs (what the RL losses rely on):
- logprobs[r, t] = log p(token | prefix) under the distribution actually sampled from: after the
  temperature, top-k and top-p filtering (renormalised over the kept ids) and the vocab_size mask.
  With top_k = 0 and top_p = 1 this is log_softmax(z / temperature), what logprobs.token_logprobs
  recomputes from the same tokens (up to the mass of ids >= vocab_size: zero at the model's).
- Greedy (temperature 0): log_softmax(z) over the ids below vocab_size (temperature 1).
- 0 wherever completion_mask is 0.

Random numbers. Token t of sample j of prompt i is sampled with the uniform
    u = (h >> 8) / 2^24,   h = mix32(stream_key(seed, prompt_key_i, j) + t * WEYL32 mod 2^32)
mix32 is lowbias32 (C. Wellons, "Hash function prospector", 2018), a bijective 32-bit
xorshift-multiply mixer; a Weyl sequence through a mixer is SplitMix's construction (Steele, Lea
and Flood, 2014). A draw is a pure function of its coordinates (a counter-based generator, as
Philox; Salmon et al., 2011), so a completion depends neither on its slot, its neighbours, the slot
count nor on how many processes share the prompts (each passes the global prompt keys of its
share). One torch.Generator per row would give the same property at a kernel launch per row per
step; the hash is a few dozen integer ops on an (R,) tensor, with no state: safe in a CUDA graph.
All arithmetic stays below 2^63 in int64 (mul32 splits a 32 x 32-bit product), so no overflow.
u has 24 random bits, as torch.rand's float32 has. Streams are 32-bit: two of them coincide with
probability 2^-32 (correlated numbers for two rows, each still sampled from its exact distribution).
"""

import math

import torch


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


def sample_tokens(logits, temperature, top_k, top_p, uniform=None):
    """One token per row from (R, V) float32 logits, and its log-prob (see the module docstring),
    given each row's random number in `uniform` ((R,) floats in [0, 1); None when greedy).

    Both modes start from w = exp(z - max z), the unnormalised probabilities, summed in blocks of
    `block` ids (block = gcd(V, 1024): 128 for Qwen's 151,936 ids). A cumulative sum over the
    blocks finds the block holding the token, and one over that block's ids finds the id: the same
    inverse CDF as a cumulative sum over all V ids, for one pass over the logits instead of three
    (softmax, cumsum, search), which is most of a small model's sampling time on CPU.
    log p(token) = z_token - max z - log(sum w).
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


# -----------------------------------------------------------------------------
# Counter-based random numbers

MASK32 = 0xFFFFFFFF
WEYL32 = 0x9E3779B9  # 2^32 / golden ratio, odd: t -> t * WEYL32 visits every 32-bit value
LOWBIAS32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32's two odd multipliers (Wellons' search)
UNIFORM_BITS = 24  # the bits of h a uniform keeps: float32's significand, as torch.rand


def mul32(x, m):
    """(x * m) mod 2^32 for 0 <= x, m < 2^32, never above 2^49: int64 tensors or Python ints."""
    return ((x & 0xFFFF) * m + ((((x >> 16) * m) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32: a bijection of 32-bit values in which every input bit flips each output bit
    with probability close to 1/2."""
    first, second = LOWBIAS32_MULTIPLIERS
    x = mul32(x ^ (x >> 16), first)
    x = mul32(x ^ (x >> 15), second)
    return x ^ (x >> 16)


def stream_key(seed, prompt_key, sample):
    """The 32-bit key of one (prompt, sample) stream of random numbers (host side, Python ints):
    the 64-bit seed and prompt key, split into 32-bit words, and the sample index, folded through
    mix32 one word at a time, starting from WEYL32."""
    h = WEYL32
    for word in (seed & MASK32, (seed >> 32) & MASK32, prompt_key & MASK32, (prompt_key >> 32) & MASK32, sample):
        h = mix32(h ^ word)
    return h


def counter_uniform(stream, t):
    """The uniform in [0, 1) of draw t of each stream: (R,) int64 keys and counters -> (R,) float32."""
    h = mix32((stream + t * WEYL32) & MASK32)  # t < 2^30 (a token index): below 2^63
    return (h >> (32 - UNIFORM_BITS)).float() * 2.0 ** -UNIFORM_BITS
