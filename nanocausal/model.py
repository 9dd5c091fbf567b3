"""
The transformer every nanocausal script trains and samples from, and its Hugging Face loader.

One decoder covers the checkpoints people post-train for causal reasoning:
- Llama (Llama-3.x, SmolLM2): RMSNorm, rotary embeddings (with llama3 frequency scaling),
  grouped-query attention, SwiGLU MLP, tied or untied output head.
- Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen, the paper's backbone): Llama plus a bias on
  the q, k and v projections.
- Qwen3: Llama plus an RMSNorm over each head of q and k (before the rotation), no biases, and
  a head_dim that need not equal hidden_size / num_attention_heads.

Everything is read from the checkpoint's config.json; module names follow the Hugging Face
parameter names (minus the "model." prefix), so loading is a name-by-name copy in which every
tensor is checked, and `save_pretrained` writes a folder that transformers loads unchanged.

Shapes in comments: B batch, T time (query positions), S key positions, C hidden size,
H query heads, K key/value heads, D head dim, V vocabulary.
"""

import json
import math
import os
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
        rope_scaling = cfg.get("rope_scaling") or rope or None
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", "linear", "llama3"):
                raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
            rope_scaling["rope_type"] = rope_type
            if rope_type == "default":
                rope_scaling = None
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
    """nn.Linear that can multiply by an (in, out) copy of its weight instead of the (out, in)
    weight itself. For the few rows of a decode step on CPU, MKL runs x @ W_t 1.5x (1 thread) to
    4.5x (2 threads) faster than F.linear's x @ W^T (measured on SmolLM2's shapes), so
    sampling.generate sets `weight_t` on every Linear for the length of a CPU call. Checkpoints,
    training and GPU runs never see it."""

    weight_t = None

    def forward(self, x):
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


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


def rotate_half(x):
    """The rotate-half convention of HF checkpoints: pairs are (x[i], x[i + D/2]), not adjacent."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


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
            # Write this step's keys/values into the preallocated cache at `cache_position` and
            # attend over the whole cache; the mask hides slots not written yet. Shapes never change.
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
            v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


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
        mask = None  # None = plain causal attention, the fast path
        if kv_cache is not None or attention_mask is not None:
            query_slot = cache_position if kv_cache is not None else torch.arange(T, device=input_ids.device)
            S = kv_cache[0][0].shape[2] if kv_cache is not None else T
            key_slot = torch.arange(S, device=input_ids.device)
            causal = key_slot[None, :] <= query_slot[:, None]  # (T, S)
            mask = causal[None, None]
            if attention_mask is not None:
                # A padding query would see no key at all (NaN); let every query see itself.
                itself = key_slot[None, :] == query_slot[:, None]
                mask = (causal & attention_mask.bool()[:, None, None, :]) | itself  # (B, 1, T, S)

        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2), float32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, block in enumerate(self.layers):
            layer_cache = kv_cache[i] if kv_cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, layer_cache, cache_position, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, layer_cache, cache_position)
        return self.norm(x)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @staticmethod
    def hf_name(name: str) -> str:
        """Our parameter name -> the checkpoint's: everything but the head lives under "model."."""
        return name if name.startswith("lm_head.") else "model." + name

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None) -> "Transformer":
        """Load a local Hugging Face folder or a hub id (safetensors only).

        The model is built on the meta device (no memory), then each parameter is read from disk
        straight into its final tensor, so at no point do two copies of the weights exist.
        dtype defaults to float32; device to CPU.
        """
        path = resolve_checkpoint(name_or_path)
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            try:
                config = ModelConfig.from_dict(json.load(f), source=config_path)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(config)

        expected = {cls.hf_name(n): p for n, p in model.named_parameters()}  # tied head appears once, as embed_tokens
        tensor_files = safetensors_files(path)
        loaded = set()
        for file in tensor_files:
            for key, tensor in read_safetensors(file, only=expected.keys() | {"lm_head.weight"}):
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the head too; it is the embedding
                if key not in expected:
                    raise ValueError(f"{file}: unexpected tensor {key} with shape {tuple(tensor.shape)}")
                want = tuple(expected[key].shape)
                if tuple(tensor.shape) != want:
                    raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)} but the config expects {want}")
                set_parameter(model, key, tensor.to(device=device, dtype=dtype))
                loaded.add(key)
        missing = sorted(expected.keys() - loaded)
        if missing:
            raise ValueError(f"{path}: missing tensor {missing[0]} (expected shape {tuple(expected[missing[0]].shape)})"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inverse_frequencies(config).to(device)
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 1024**3):
        """Write config.json and model.safetensors (or shards + index) that transformers loads."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        dtype = self.embed_tokens.weight.dtype
        config = dict(self.config.raw)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

        state = {self.hf_name(n): p.detach().contiguous().cpu() for n, p in self.named_parameters()}  # tied head saved once
        shards, current, size = [], {}, 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = tensor
            size += nbytes
        shards.append(current)
        for old in os.listdir(out_dir):  # a re-save with fewer shards must not leave stale ones behind
            if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
                os.remove(os.path.join(out_dir, old))
        if len(shards) == 1:
            save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def set_parameter(model: nn.Module, hf_key: str, tensor: torch.Tensor):
    """Replace the (meta) parameter named by a checkpoint key with a loaded tensor."""
    name = hf_key.removeprefix("model.")
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad))


# -----------------------------------------------------------------------------
# Files on disk

HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def resolve_checkpoint(name_or_path) -> str:
    """A local folder as is; otherwise a hub id, downloaded (config, safetensors, tokenizer only)."""
    path = str(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"{path} is neither a checkpoint folder nor a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=HUB_PATTERNS)


def safetensors_files(path) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise ValueError(f"{index} names {os.path.basename(file)}, which is not in {path}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{path} is not a Hugging Face checkpoint: no model.safetensors or model.safetensors.index.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(file, only=None):
    """Yield (name, tensor) from a .safetensors file, reading each tensor straight into its memory.

    The format is simple: 8 bytes (little-endian) giving the header's length, a JSON header mapping
    each name to {dtype, shape, data_offsets}, then the raw bytes. Reading it with plain file reads
    (no mmap) keeps peak memory at the size of the tensors we keep, and lets us check every offset
    against the file's size, so a truncated or corrupted file fails loudly instead of half-loading.
    """
    file_size = os.path.getsize(file)
    with open(file, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= file_size - 8:
                raise ValueError(f"header length {header_len} does not fit a {file_size}-byte file")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            data_start = 8 + header_len
            entries = []
            for name, info in header.items():
                begin, end = info["data_offsets"]
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if end - begin != nbytes or data_start + end > file_size:
                    raise ValueError(f"tensor {name} needs bytes {begin}..{end} of the data but the file holds {file_size - data_start}")
                entries.append((begin, name, dtype, shape, nbytes))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is truncated or corrupted: {e}") from None
        for begin, name, dtype, shape, nbytes in sorted(entries):
            if only is not None and name not in only:
                yield name, torch.empty(shape, dtype=dtype, device="meta")  # let the caller name it as unexpected
                continue
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(data_start + begin)
            if f.readinto(buffer.numpy()) != nbytes:
                raise ValueError(f"{file} is truncated or corrupted: tensor {name} is cut short")
            yield name, buffer.view(dtype).reshape(shape)
