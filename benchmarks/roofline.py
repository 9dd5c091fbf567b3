"""
The two numbers a GPU measurement is compared with, counted by hand from the model's shapes: the
FLOPs a training step actually runs (for MFU) and the bytes a decode step actually reads from HBM
(for the bandwidth share). Plain arithmetic on a ModelConfig: no torch, no device.

Notation: C hidden size, F MLP width, H/K query/key-value heads of size D, L layers, V vocabulary.
A matmul of an (n, a) by an (a, b) matrix is 2nab FLOPs (a multiply and an add per term).

Training FLOPs of one row of T tokens (padding included: it runs) of which N are completion tokens:

  layers      the matmul weights of a block, W = C(H + 2K)D + HDC + 3CF per layer (q, k, v, o,
              gate, up, down; biases and norms are not matmuls). Forward 2TW; backward 2TW for the
              input gradients and, when the weights train, 2TW for their gradients: 6TW for full
              fine-tuning, 4TW for LoRA's frozen base. With LoRA the embedding is frozen too, so the
              first block's q, k, v send no gradient back: 2T(C(H + 2K)D + Cr per adapter on them) less.
  LoRA        an adapted (a -> b) Linear adds A (a x r) and B (r x b): r(a + b) trained weights,
              6Tr(a + b) (forward, input and weight gradients).
  recompute   activation checkpointing runs each block's forward again in backward, but torch's
              non-reentrant checkpoint stops once backward has every tensor it saved: the block's
              last matmul (down_proj, or the B of an adapter on it), whose output only feeds the
              residual add, is not run again: 2T(W + adapters - FC, or - rC).
  attention   a query at position t attends to t + 1 keys: QK^T and PV are 2HD(t + 1) each, so a
              causal row is 4HD * T(T + 1)/2 forward per layer, twice that in backward (dQ, dK from
              dS; dV, dP); + 4HD * T(T + 1)/2 when recomputed. (Flash's backward also recomputes
              QK^T: algorithmic FLOPs are counted, that kernel-internal recompute is not.)
  head        logprobs.token_logprobs sends only the N hidden states that predict a completion token
              (positions prompt-1 .. T-2) through the head: 2NCV forward, recomputed once in backward
              (its chunks are checkpointed), 2NCV for the input gradient and 2NCV for the weight's
              when it trains (full fine-tuning): 8NCV, or 6NCV for LoRA's frozen head.
  embedding   a lookup, no matmul: 0 (its gradient is a scatter-add).

Bytes read by one decode step of `batch` rows that attend to `width` cache columns each:

  weights     every parameter (blocks, final norm, the head's V x C matrix) once per step whatever
              the batch, except an untied embedding table: only the rows looked up (batch x C).
              A tied head reads the whole table anyway, as the head (+ batch x C for the lookup).
  KV cache    batch x width x L x 2 x K x D elements (the keys and values attended; a CUDA-graph
              step attends to its bucket's width, generate.bucket_width, an eager one to the used columns).
"""

PEAK_HBM_TB_S = {"H200": 4.8, "H100 80GB HBM3": 3.35}  # H200 (SXM and NVL); H100 SXM (its torch name)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0}  # dense, no sparsity


def from_device_name(table, name):
    """The value of the first key found in the device name (torch.cuda.get_device_name), else None."""
    return next((value for key, value in table.items() if key in name), None)


def block_matmul_weights(c):
    """W: the weights of one block that multiply every token (q, k, v, o, gate, up, down)."""
    return c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
        + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def lora_weights_per_block(c, rank, targets):
    """r(a + b) summed over a block's adapted Linears (a -> b)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sizes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
             "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
             "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    return sum(rank * sum(sizes[t]) for t in targets)


def training_flops(c, rows, lora_rank=0, lora_targets=(), checkpointing=False):
    """FLOPs of one forward + backward over `rows`, a list of (tokens, completion_tokens) per row
    (module docstring). lora_rank 0: full fine-tuning (every weight trains, the head too)."""
    C, F, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    W, qkv = block_matmul_weights(c), C * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    adapter = lora_weights_per_block(c, lora_rank, lora_targets) if lora_rank else 0
    # the block's last matmul only feeds the residual add: non-reentrant checkpointing stops before it
    last = lora_rank * C if "down_proj" in lora_targets and lora_rank else F * C
    recomputed = (W + adapter - last) if checkpointing else 0
    per_token = L * (2 * recomputed + ((4 if lora_rank else 6) * W + 6 * adapter))
    if lora_rank:  # the first block's q, k, v read the frozen embedding: no gradient to send back to it
        per_token -= 2 * (qkv + C * lora_rank * sum(t in ("q_proj", "k_proj", "v_proj") for t in lora_targets))
    head_per_token = (6 if lora_rank else 8) * C * c.vocab_size
    attention_per_pair = L * 4 * c.num_attention_heads * c.head_dim * (3 + (1 if checkpointing else 0))
    return sum(tokens * per_token + completion * head_per_token + attention_per_pair * tokens * (tokens + 1) // 2
               for tokens, completion in rows)


def decode_step_bytes(c, parameters, batch, width, weight_bytes=2, cache_bytes=2):
    """Bytes one decode step reads from HBM (module docstring); `parameters`: the model's count
    (a tied head counted once)."""
    table = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size  # an untied table: rows only
    cache = batch * width * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim
    return (parameters - table + batch * c.hidden_size) * weight_bytes + cache * cache_bytes
