"""
The transformer every nanocausal script trains and samples from, and its Hugging Face loader.

One decoder covers the checkpoints people post-train for causal reasoning:
- Llama (Llama-3.x, SmolLM2): RMSNorm, rotary embeddings (with llama3 frequency scaling),
  grouped-query attention, SwiGLU MLP, tied or untied output head.
- Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen, the paper's backbone): Llama plus a bias on
  the q, k and v projections.
- Qwen3: Llama plus an RMSNorm over each head of q and k (before the rotation), no biases, and
  a head_dim that need not equal hidden_size / num_attention_heads.

Module names are the Hugging Face parameter names (minus the "model." prefix), so
checkpoint.load_model and save_model copy tensors name by name, in folders transformers reads.

Shapes in comments: B batch, T time (query positions), S key positions, C hidden size,
H query heads, K key/value heads, D head dim, V vocabulary.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2 always; Llama when config.attention_bias)
    output_bias: bool  # bias on the attention output projection (Llama's attention_bias; never Qwen)
    mlp_bias: bool  # bias on the MLP projections (Llama's mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    raw: dict = field(default_factory=dict, repr=False)  # the config.json we came from, saved back as is

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        # Newer transformers nest rope settings under "rope_parameters"; published checkpoints keep
        # rope_theta / rope_scaling at the top level. Accept both.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = dict(cfg.get("rope_scaling") or rope)
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
        rope_scaling = dict(rope_scaling, rope_type=rope_type) if rope_type != "default" else None
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                model_type=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                output_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
                mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                raw=dict(cfg),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


# -----------------------------------------------------------------------------
# Building blocks


class Linear(nn.Linear):
    """nn.Linear with two optional extras, both off by default:

    - LoRA adapters (nanocausal/lora: y = W x + b + scale * B A dropout(x)): submodules lora_A and
      lora_B set by lora.add_lora, skipped while lora_enabled is False (the reference);
    - weight_t, an (in, out) copy of the weight, set during CPU generation only
      (generate.cpu_weight_layout): for the few rows of a decode step MKL runs x @ W_t 1.5x (1
      thread) to 4.5x (2 threads) faster than F.linear's x @ W^T (measured on SmolLM2's shapes).
    """

    weight_t = None
    has_lora = False  # (a class attribute named lora_A would hide the registered submodule)
    lora_enabled = True

    def forward(self, x):
        if self.weight_t is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = x @ self.weight_t
            y = y if self.bias is None else y + self.bias
        if self.has_lora and self.lora_enabled:
            # float32 adapters on a bf16 base: the low-rank path runs in the adapters' dtype
            update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
            y = y + (update * self.lora_scale).to(y.dtype)
        return y


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as HF does) then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i/D), rescaled per frequency for llama3 / linear rope_scaling."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies (short wavelengths), divide low frequencies by `factor`, and
    # interpolate smoothly in between, so a model trained at 8k positions reads 128k.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """The rotate-half convention of HF checkpoints: pairs are (x[i], x[i + D/2]), not adjacent."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(C, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, C, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_position=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # the mask hides the columns not written yet: shapes never change
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
            v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        if T == 1 and mask is not None and self.n_kv_heads != self.n_heads:
            y = self.folded_decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def folded_decode_attention(self, q, k, v, mask):
        """Attention of one query token per row with G = H / K query heads per key/value head, as
        ordinary attention over K heads of G query positions each:

            q (B, H, 1, D) -> (B, K, G, D)      k, v (B, K, S, D) as they are      mask (B, 1, 1, S)

        Query head h = k * G + g reads key/value head k (the grouping enable_gqa uses), and the G
        queries of a group share their mask row, so the result is the same attention. Why: SDPA
        with a mask and enable_gqa has no fused CUDA kernel on many torch builds and falls back to
        the math kernel (K/V repeated to H heads, scores upcast to fp32: gigabytes of temporaries
        per layer per step at 7B); with this layout the memory-efficient kernel takes it, reading
        each cached key and value once for its whole group."""
        B, H, _, D = q.shape
        y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, H // self.n_kv_heads, D), k, v, attn_mask=mask)
        return y.view(B, H, 1, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(C, F_, bias=bias)
        self.up_proj = Linear(C, F_, bias=bias)
        self.down_proj = Linear(F_, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, cache_position=None):
        """Logits (B, T, V). See `hidden_states` for the arguments."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, cache_position))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, cache_position=None):
        """Final normalised hidden states (B, T, C): what the output head (or a value head) reads.

        input_ids (B, T). attention_mask (B, S), 1 on real tokens and 0 on (left) padding, where
        S = T without a cache and S = cache length with one. position_ids (B, T) default to the
        count of real tokens before each one, so a left-padded row sees the positions it would
        see unpadded. kv_cache: one (k, v) pair of (B, K, S, D) tensors per layer, written in
        place at cache_position (T,), the cache slots of this call's tokens.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        # cos/sin and the mask in the compute dtype: under bf16 autocast q and k come out of their
        # projections in bf16 and stay bf16 (fp32 cos/sin would promote them, and the cache write would cast back)
        dtype = self.compute_dtype()
        mask = None  # None = plain causal attention, the fast path
        if kv_cache is not None or attention_mask is not None:
            query_slot = cache_position if kv_cache is not None else torch.arange(T, device=input_ids.device)
            S = kv_cache[0][0].shape[2] if kv_cache is not None else T
            key_slot = torch.arange(S, device=input_ids.device)
            visible = (key_slot[None, :] <= query_slot[:, None])[None, None]  # causal, (1, 1, T, S)
            if attention_mask is not None:
                # A padding query would see no key at all (NaN); let every query see itself.
                itself = key_slot[None, :] == query_slot[:, None]
                visible = (visible & attention_mask.bool()[:, None, None, :]) | itself  # (B, 1, T, S)
            # Additive: scores + 0 where visible, + -inf where not. Built once here and shared by
            # every layer; a bool mask would be converted into exactly this inside each layer's SDPA.
            mask = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device).masked_fill_(~visible, float("-inf"))

        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2), float32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        for i, block in enumerate(self.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, layer_cache, cache_position, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, layer_cache, cache_position)
        return self.norm(x)

    def compute_dtype(self):
        """The dtype the matrix multiplies run in: autocast's when autocast is on for the weights'
        device (bf16 under training.autocast on CUDA), else the weights' own. The KV cache and the
        rotary cos/sin take it."""
        device_type = self.embed_tokens.weight.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.embed_tokens.weight.dtype

    @torch.no_grad()
    def init_weights(self, generator=None):
        """GPT-2 style initialisation: N(0, 0.02) matrices, zero biases, unit norms (for models built
        from nothing: the tiny base, random-weight models of a real shape)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
        return self

    def reset_rope(self, device=None):
        """Recompute the rotary frequencies (a non-persistent buffer, so never in a checkpoint)."""
        self.inv_freq = rope_inverse_frequencies(self.config).to(device or self.embed_tokens.weight.device)
