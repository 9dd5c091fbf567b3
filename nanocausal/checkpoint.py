"""Everything nanocausal keeps on disk, in one module, so that model.py holds only the network.

A checkpoint is a standard Hugging Face folder, loadable by transformers, vLLM and every script
here, plus what --resume needs:

    config.json                  the model's config, saved back as it was read
    model.safetensors            the weights (or model-0000N-of-0000M.safetensors + an index)
    tokenizer.json, ...          the tokenizer files of the model it started from (TOKENIZER_FILES)
    value_head.safetensors       extra modules (PPO's value head), when there are any
    trainer_state.pt             optimiser state, step, data position, RNG states, the run's config
    manifest.json                every file's size and SHA-256, written last: the folder is whole

Every file is read through nanocausal.safe_files (no code path), each weight checked against the
config before it is copied into the model, and each file's SHA-256 first (`verify`).
"""

import hashlib
import json
import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError

from nanocausal import lora
from nanocausal.model import ModelConfig, Transformer
from nanocausal.safe_files import (check_optimizer_state, load_plain, read_json, read_safetensors, read_tensors,
                                   safetensors_files)

# The files of a checkpoint, one list each: what a hub download fetches and what a save copies.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json"]
MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", lora.ADAPTER_CONFIG]

# -----------------------------------------------------------------------------
# Finding a checkpoint: a local folder or a hub id


def resolve(name_or_path, patterns) -> str:
    """A local folder as is; otherwise a hub id such as "Qwen/Qwen2.5-0.5B-Instruct", downloaded
    into the Hugging Face cache (only the files matching `patterns`)."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"{path} is neither a checkpoint folder nor a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=patterns)


def resolve_model(name_or_path, files=MODEL_FILES + TOKENIZER_FILES) -> str:
    """The folder of a model checkpoint (a hub id downloads `files`: weights and tokenizer), checked
    to hold a config.json (or, for a LoRA adapter, an adapter_config.json)."""
    path = resolve(name_or_path, files)
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", lora.ADAPTER_CONFIG)):
        raise ValueError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    return path


def is_adapter(folder):
    return os.path.isfile(os.path.join(folder, lora.ADAPTER_CONFIG))


def base_of(folder):
    """The base model a LoRA adapter folder was trained on (a hub id or a folder)."""
    return lora.read_adapter_config(folder)["base_model_name_or_path"]


def adapter_base(folder, files=MODEL_FILES + TOKENIZER_FILES) -> str:
    """The folder of an adapter's base model, checked to be a full model. An adapter on an adapter
    is refused: nanocausal holds one adapter per layer, and a cycle ends in one line, not a
    RecursionError. `files`: what a hub base downloads (resolve_model)."""
    base = resolve_model(base_of(folder), files)
    if is_adapter(base):
        same = os.path.realpath(base) == os.path.realpath(folder)
        raise ValueError(f"{os.path.join(folder, lora.ADAPTER_CONFIG)}: base_model_name_or_path names "
                         + ("this adapter itself" if same else f"{base}, another LoRA adapter")
                         + ": the base must be a full model (config.json + safetensors)")
    return base


def file_sha256(path, chunk_bytes=16 * 1024**2) -> str:
    """The SHA-256 of a file's bytes, read a chunk at a time (about 1-2 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(name_or_path) -> str:
    """What a model *is*, by content rather than by path: the SHA-256 over the names and SHA-256s
    of the files that define it (config, weights, adapter and tokenizer files, chat template; for
    a LoRA adapter its base's too), so a moved folder keeps it. A plain file (a config.json of a
    random-weight model, a data file) is its own SHA-256. Used by eval.py to refuse another
    model's answers and by --resume to compare paths."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isfile(path):
        return file_sha256(path)
    folder = resolve_model(path)
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(folder) if n.endswith((".json", ".safetensors", ".jinja")) and n != MANIFEST)
    for name in names:
        digest.update(f"{name} {file_sha256(os.path.join(folder, name))}\n".encode())
    if is_adapter(folder):
        digest.update(f"base {fingerprint(adapter_base(folder))}\n".encode())
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Weights: safetensors in, safetensors out


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's: everything but the head lives under "model."."""
    return name if name.startswith("lm_head.") else "model." + name


def load_model(name_or_path, dtype=None, device=None) -> Transformer:
    """Load a local Hugging Face folder or a hub id (safetensors only) as a Transformer in eval mode
    (float32 on the CPU by default). The model is built on the meta device, then each parameter is
    read from disk straight into its final tensor: at no point do two copies of the weights exist.
    A LoRA adapter folder loads as its base with the adapters added; a config.json as a
    random-weight model of its shape."""
    if str(name_or_path).endswith(".json") and os.path.isfile(name_or_path):
        return random_model(name_or_path, dtype, device)
    path = resolve_model(name_or_path)
    if is_adapter(path):  # a LoRA adapter (ours or peft's): its base, with the adapters on top
        verify(path, [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS])
        model = load_model(adapter_base(path), dtype, device)
        model.lora_base = base_of(path)
        return lora.load_adapter(model, path)
    files = safetensors_files(path)
    verify(path, ["config.json", "model.safetensors.index.json"] + [os.path.basename(f) for f in files])
    config = read_config(os.path.join(path, "config.json"))
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config)

    expected = {hf_name(n): p for n, p in model.named_parameters()}  # a tied head appears once, as embed_tokens
    loaded = set()
    for file in files:
        for key, tensor in read_safetensors(file, only=expected.keys() | {"lm_head.weight"}):
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints store the head too; it is the embedding
            if key not in expected:
                raise ValueError(f"{file}: unexpected tensor {key} with shape {tuple(tensor.shape)}")
            want = tuple(expected[key].shape)
            if tuple(tensor.shape) != want:
                raise ValueError(f"{file}: tensor {key} has shape {tuple(tensor.shape)} but the config expects {want}")
            if not tensor.dtype.is_floating_point:  # an integer tensor would be cast to float without a word
                raise ValueError(f"{file}: tensor {key} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                                 f"a weight must be a floating-point tensor")
            # the meta parameter is replaced; move, then convert: a bf16 checkpoint crosses to the
            # GPU in bf16 (half the bytes of converting first on the CPU) and is widened there
            module_name, _, attr = key.removeprefix("model.").rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(tensor.to(device).to(dtype), requires_grad=expected[key].requires_grad))
            loaded.add(key)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]} (expected shape {tuple(expected[missing[0]].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval()


def read_config(config_path) -> ModelConfig:
    """A config.json as a ModelConfig; errors name the file."""
    return ModelConfig.from_dict(read_json(config_path), source=str(config_path))


def random_model(config_json, dtype=None, device=None, seed=0):
    """A random-weight model (init_weights) of a config.json's shape, built on the meta device, made in `dtype`
    on `device` (no float32 copy, no default init). CPU and CUDA generators differ: build on CPU, then copy."""
    with torch.device("meta"):
        model = Transformer(read_config(config_json)).to(dtype or torch.float32)
    model.to_empty(device=device or "cpu")
    if model.config.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope()
    return model.init_weights(generator=torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)).eval()


def save_model(model: Transformer, out_dir, max_shard_bytes=5 * 1024**3):
    """Write config.json and model.safetensors (or shards + index) that transformers loads; for a
    LoRA model, the adapters only, as a peft folder whose base is model.lora_base."""
    from safetensors.torch import save_file  # looked up at each call: a test fills the disk through it

    os.makedirs(out_dir, exist_ok=True)
    if lora.is_lora_model(model):
        return lora.save_adapter(model, out_dir, model.lora_base)
    config = dict(model.config.raw)
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    state = {hf_name(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()}  # a tied head once
    shards, size = [{}], 0
    for key, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][key], size = tensor, size + tensor.nbytes
    for old in os.listdir(out_dir):  # a re-save with fewer shards must not leave stale ones behind
        if old.startswith("model") and old.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, old))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}, f,
                  indent=2)


# -----------------------------------------------------------------------------
# Training checkpoints: the folder above plus trainer_state.pt, to resume exactly


def rng_state():
    """Every RNG a run draws from, as tensors and plain types (so weights_only loading accepts it)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MANIFEST = "manifest.json"  # written last: a folder with a manifest that matches its files is whole


def crash_point(name):
    """Fault injection for the tests: with NANOCAUSAL_CRASH_AT=name (or name:n) the process kills
    itself (SIGKILL: no cleanup, as a power cut or an OOM kill) the first (n-th) time a save
    reaches point `name`. Costs one environment lookup when unset."""
    point, _, nth = os.environ.get("NANOCAUSAL_CRASH_AT", "").partition(":")
    if point == name:
        _crash_counts[name] = _crash_counts.get(name, 0) + 1
        if _crash_counts[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


_crash_counts = {}


def _fsync(path):  # a file's bytes, or a folder's entries, on disk before we go on
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder):
    """manifest.json as {"step", "files": {name: bytes}, "sha256": {name: hex}} (sha256 {} when
    absent); one-line ValueError for anything else."""
    path = os.path.join(folder, MANIFEST)
    manifest = read_json(path)
    files, hashes = manifest.get("files"), manifest.setdefault("sha256", {})
    if not (isinstance(files, dict) and all(type(n) is int for n in files.values()) and isinstance(hashes, dict)
            and all(isinstance(h, str) for h in hashes.values())):
        raise ValueError(f"{path}: expected 'files' (name -> size in bytes) and 'sha256' (name -> hex digest)")
    return manifest


def is_complete(folder):
    """True when `folder` holds a manifest and every file it lists, at the listed size. Sizes
    only, on purpose: `recover` asks this at the start of every run and save, and an interrupted
    save shows as missing or short files, never as other bytes of the same size (flipped bits are
    `verify`'s business, when a checkpoint is loaded)."""
    try:
        files = read_manifest(folder)["files"]
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(folder, n)) and os.path.getsize(os.path.join(folder, n)) == size
               for n, size in files.items())


def verify(folder, names):
    """Check the files `names` of a checkpoint folder against its manifest, before they are read:
    each must be listed (a file added after the save is not part of the checkpoint), present, of
    its size and of its SHA-256. A folder without a manifest (a downloaded model) passes; names
    that exist neither on disk nor in the manifest are skipped (model.safetensors.index.json of a
    one-file model).

    Cost: one read of each file at file_sha256's speed, 1.4 GB/s on one core of a shared laptop
    CPU (a 1 GB file, page cache warm), so resuming a 7B model in bf16 adds about 11 s for its
    15 GB of weights and 45 s for its full-fine-tuning trainer_state.pt (61 GB), against a load
    that reads those bytes anyway. Under torchrun each rank verifies what it reads."""
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        return
    manifest = read_manifest(folder)
    for name in names:
        path = os.path.join(folder, name)
        if name not in manifest["files"]:
            if os.path.exists(path):
                raise ValueError(f"{path} is not part of the checkpoint that was saved ({MANIFEST} does not list it)")
            continue
        if not os.path.isfile(path) or os.path.getsize(path) != manifest["files"][name]:
            raise ValueError(f"{path} is missing or not the size {MANIFEST} records: the checkpoint is damaged")
        if name in manifest["sha256"] and file_sha256(path) != manifest["sha256"][name]:
            raise ValueError(f"{path}: its bytes are not the ones saved (SHA-256 differs from {MANIFEST}): the "
                             f"file is corrupted")


def saved_step(folder):
    return read_manifest(folder).get("step")


def recover(out_dir):
    """Finish or undo a save that a crash interrupted, so that out_dir is the newest whole
    checkpoint (or absent) and no leftover blocks the next save. A save writes out_dir.tmp, renames
    out_dir -> out_dir.old and out_dir.tmp -> out_dir, then removes out_dir.old. A crash can leave:
    a partial .tmp (removed); a whole .tmp newer than out_dir, or out_dir missing (the swap is
    finished); a .old beside a whole out_dir (removed) or instead of it (put back)."""
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    if not (os.path.isdir(tmp) or os.path.isdir(old)):
        return  # nothing left over (every run and every save start here: the common case costs two stats)
    if os.path.isdir(tmp):
        newer = is_complete(tmp) and not (is_complete(out_dir) and saved_step(out_dir) >= saved_step(tmp))
        if newer:
            if os.path.isdir(out_dir):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
        else:
            shutil.rmtree(tmp)
    if os.path.isdir(old):
        if not os.path.isdir(out_dir) and is_complete(old):
            os.replace(old, out_dir)
        else:
            shutil.rmtree(old)
    _fsync(os.path.dirname(os.path.abspath(out_dir)))


def copy_tokenizer_files(source, out_dir):
    """Copy the tokenizer files of a checkpoint (an adapter folder without them: its base's); a
    config.json (a random-weight model) has none."""
    if str(source).endswith(".json"):
        return
    folder = resolve_model(source)
    if is_adapter(folder) and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        folder = resolve_model(base_of(folder))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), out_dir)


def save_checkpoint(out_dir, model, tokenizer_source, optimizer, trainer_state, extra_modules=None, keep=1,
                    staged=None):
    """Write out_dir as the folder of the module docstring, so that --resume continues exactly.
    trainer_state holds plain types only; extra_modules (PPO's value head) are saved as
    <name>.safetensors; staged is a folder of files written before the call (under torchrun every
    rank's optimiser shard and RNG state), moved in before the manifest.

    Crash-safe: everything is written into a fresh out_dir.tmp and fsynced, the manifest last; then
    out_dir.tmp replaces out_dir by two renames. A kill at any moment leaves either the old or the
    new checkpoint whole, and `recover` (run by the next save and at the start of every run)
    completes or removes what is left over. A failed write (a full disk) removes out_dir.tmp and
    raises one OSError naming out_dir, which is untouched. keep > 1 keeps the previous keep - 1
    checkpoints beside it as out_dir-STEP (e.g. checkpoint-000400)."""
    out_dir = out_dir.rstrip("/")
    tmp_dir, old_dir = out_dir + ".tmp", out_dir + ".old"
    recover(out_dir)
    try:
        _write_folder(tmp_dir, model, tokenizer_source, optimizer, trainer_state, extra_modules, staged)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save and safetensors raise their own
        shutil.rmtree(tmp_dir, ignore_errors=True)  # give the space back; out_dir was not touched
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise OSError(f"{out_dir}: the checkpoint could not be written ({reason}); the previous checkpoint, if any, "
                      f"is kept as it was") from None
    crash_point("manifest")
    previous_step = saved_step(out_dir) if is_complete(out_dir) else None
    if os.path.isdir(out_dir):
        os.replace(out_dir, old_dir)
    crash_point("moved_old")
    os.replace(tmp_dir, out_dir)
    _fsync(os.path.dirname(os.path.abspath(out_dir)))
    crash_point("moved_new")
    if keep > 1 and previous_step is not None:
        os.replace(old_dir, f"{out_dir}-{previous_step:06d}")
        kept = kept_checkpoints(out_dir)
        for path in kept[:max(0, len(kept) - (keep - 1))]:
            shutil.rmtree(path)
    shutil.rmtree(old_dir, ignore_errors=True)
    crash_point("removed_old")


def kept_checkpoints(out_dir):
    """The paths of the earlier checkpoints --keep holds beside out_dir (out_dir-STEP), oldest first."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    return sorted(os.path.join(parent, d) for d in os.listdir(parent)
                  if d.startswith(base + "-") and d.rsplit("-", 1)[1].isdigit())


def _write_folder(tmp_dir, model, tokenizer_source, optimizer, trainer_state, extra_modules, staged):
    """save_checkpoint's writing: every file into tmp_dir, fsynced, then the manifest (hashing
    re-reads the files from the page cache)."""
    from safetensors.torch import save_file

    save_model(model, tmp_dir)
    crash_point("weights")
    copy_tokenizer_files(tokenizer_source, tmp_dir)
    for name, module in (extra_modules or {}).items():  # modules, or their state dicts (gathered under torchrun)
        state = module if isinstance(module, dict) else module.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp_dir, f"{name}.safetensors"))
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "trainer_state": trainer_state, "rng": rng_state()}, os.path.join(tmp_dir, "trainer_state.pt"))
    crash_point("trainer_state")
    if staged is not None:
        for name in os.listdir(staged):
            os.replace(os.path.join(staged, name), os.path.join(tmp_dir, name))
        os.rmdir(staged)
    files = sorted(os.listdir(tmp_dir))
    for name in files:
        _fsync(os.path.join(tmp_dir, name))
    with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
        json.dump({"step": trainer_state.get("step"),
                   "files": {n: os.path.getsize(os.path.join(tmp_dir, n)) for n in files},
                   "sha256": {n: file_sha256(os.path.join(tmp_dir, n)) for n in files}}, f, indent=1)
    _fsync(os.path.join(tmp_dir, MANIFEST))
    _fsync(tmp_dir)


def read_trainer_state(checkpoint_dir, mmap=False):
    """trainer_state.pt, checked to be one save_checkpoint wrote; mmap leaves the optimiser state on disk."""
    path = os.path.join(checkpoint_dir, "trainer_state.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint_dir} cannot be resumed: it has no trainer_state.pt")
    saved = load_plain(path, "a trainer state", mmap=mmap)
    if not (isinstance(saved, dict) and isinstance(saved.get("trainer_state"), dict) and "rng" in saved):
        raise ValueError(f"{path}: not a trainer state nanocausal saved (expected optimizer, trainer_state and rng)")
    return saved


def load_trainer_state(checkpoint_dir, optimizer=None):
    """Restore the optimiser and RNG states saved by save_checkpoint; return its trainer_state dict."""
    verify(checkpoint_dir, ["trainer_state.pt"])
    saved = read_trainer_state(checkpoint_dir)
    if optimizer is not None:
        if saved.get("optimizer") is None:  # sharded in optimizer-rankR files (distributed.save_checkpoint)
            raise ValueError(f"{checkpoint_dir} was saved by {saved['trainer_state'].get('world_size')} ranks: resume it "
                             f"under torchrun with that many processes")
        check_optimizer_state(saved["optimizer"], optimizer, os.path.join(checkpoint_dir, "trainer_state.pt"))
        optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    return saved["trainer_state"]


def load_module(module: nn.Module, checkpoint_dir, name):
    """Load <checkpoint_dir>/<name>.safetensors (save_checkpoint's extra_modules) into module."""
    verify(checkpoint_dir, [f"{name}.safetensors"])
    # load_state_dict copies each tensor into its parameter, on the parameter's device and dtype
    module.load_state_dict(read_tensors(os.path.join(checkpoint_dir, f"{name}.safetensors")))
