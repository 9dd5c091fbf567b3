"""Reading files that someone else may have written: JSON, JSON Lines, safetensors and torch.save
files of tensors and plain types, with no code path.

Everything nanocausal reads from a checkpoint folder goes through here, every length and offset
checked. Errors are one line naming the file (and the tensor or key) and never quote the file's
bytes, so pointing a loader at /etc/passwd prints nothing of it.
"""
import json
import math
import os

import torch


def read_text(path):
    """A file's text (universal newlines: \r\n and \r end a line too); not UTF-8: one ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def _loads(text, path, line_number=None):
    """json.loads, every failure one ValueError naming the file and line (nesting too deep for
    Python's parser raises RecursionError, not JSONDecodeError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}{f':{line_number}' if line_number else ''}: JSON nested too deeply to read") from None


def read_json(path):
    """A JSON file's object; every failure is one ValueError naming the file."""
    value = _loads(read_text(path), path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_records(path, json_list=False, partial_last_line=False):
    """[(value, where)] of a file of JSON values a user wrote: JSON Lines (one value a line, blank
    lines skipped, where = "file:LINE"), or, json_list=True, one JSON list (where = "file: item N");
    json_list=None picks the list when the text starts with "[". Every failure is one ValueError
    naming the file and line. partial_last_line: a last line with no newline that does not parse
    is dropped, not refused (a live run's metrics.jsonl, caught half-written)."""
    text = read_text(path)
    if json_list or json_list is None and text.lstrip().startswith("["):
        items = _loads(text, path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of examples, got a {type(items).__name__}")
        return [(item, f"{path}: item {i}") for i, item in enumerate(items)]
    located, lines = [], text.split("\n")
    for line_number, line in enumerate(lines, start=1):
        if line.strip():  # a blank line holds no value
            try:
                located.append((_loads(line, path, line_number), f"{path}:{line_number}"))
            except ValueError:
                if not (partial_last_line and line_number == len(lines)):  # split's last piece: no newline after it
                    raise
    return located


def safetensors_files(path) -> list[str]:
    """The weight files of a Hugging Face folder: model.safetensors, or the files that
    model.safetensors.index.json names. The index must name plain file names of this folder:
    a `../other/model.safetensors` or `/etc/passwd` would make the loader read outside it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty object 'weight_map' of tensor name -> file name")
        for key, name in weight_map.items():  # a .safetensors name with no separator, "..", or NUL
            if not (isinstance(name, str) and name.endswith(".safetensors") and os.path.basename(name) == name
                    and "\\" not in name and "\0" not in name):
                raise ValueError(f"{index}: tensor {key} maps to {str(name)[:80]!r}, which is not a .safetensors file "
                                 f"name inside {path}")
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


def _header_entries(header, data_bytes):
    """[(begin, name, dtype, shape, nbytes)] of a parsed header, sorted by begin; a ValueError
    (the caller adds the file name) for a negative or reversed range, a range of the wrong length
    or past the end, two tensors whose bytes overlap (a crafted file could alias them)."""
    entries = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if not all(type(n) is int and n >= 0 for n in (begin, end, *shape)):
            raise ValueError(f"tensor {name}: offsets and shape must be non-negative integers")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or end > data_bytes:
            raise ValueError(f"tensor {name} needs bytes {begin}..{end} of the data but the file holds {data_bytes}")
        entries.append((begin, name, dtype, shape, nbytes))
    entries.sort(key=lambda e: (e[0], e[4]))
    for (begin, name, _, _, nbytes), following in zip(entries, entries[1:]):
        if following[0] < begin + nbytes:
            raise ValueError(f"tensors {name} and {following[1]} share bytes")
    return entries


def read_safetensors(file, only=None):
    """Yield (name, tensor) from a .safetensors file, reading each tensor straight into its memory.

    The format: 8 bytes (little-endian) giving the header's length, a JSON header mapping each
    name to {dtype, shape, data_offsets}, then the raw bytes. Plain file reads (no mmap) keep peak
    memory at the size of the tensors we keep and check every offset against the file's size, so
    a truncated or corrupted file fails loudly instead of half-loading. Names outside `only` come
    back as meta tensors, so the caller can name them as unexpected."""
    file_size = os.path.getsize(file)
    with open(file, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= file_size - 8:
                raise ValueError("its first 8 bytes are not the length of a header inside the file")
            header = json.loads(f.read(header_len).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            header.pop("__metadata__", None)
            data_start = 8 + header_len
            entries = _header_entries(header, file_size - data_start)
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            reason = "the header is not UTF-8 JSON" if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) \
                else "the header is nested too deeply" if isinstance(e, RecursionError) else \
                f"a header entry lacks or mistypes {e}" if isinstance(e, (KeyError, TypeError)) else str(e)
            raise ValueError(f"{file} is not a safetensors file, or is truncated or corrupted: {reason}") from None
        for begin, name, dtype, shape, nbytes in entries:
            if only is not None and name not in only:
                yield name, torch.empty(shape, dtype=dtype, device="meta")
                continue
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(data_start + begin)
            if f.readinto(buffer.numpy()) != nbytes:
                raise ValueError(f"{file} is truncated or corrupted: tensor {name} is cut short")
            yield name, buffer.view(dtype).reshape(shape)


def read_tensors(file):
    """{name: tensor} of a whole (small) .safetensors file."""
    return dict(read_safetensors(file))


def check_optimizer_state(saved, optimizer, path):
    """Refuse, naming the tensor, an optimiser state that does not fit `optimizer` (other groups,
    another parameter count, a moment of another shape), before load_state_dict meets it deep
    inside a torch traceback (or, for a same-size tensor of another shape, not at all)."""
    try:
        groups, state = saved["param_groups"], saved["state"]
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(f"{len(groups)} parameter groups, the optimiser has {len(optimizer.param_groups)}")
        params = {}
        for i, (group, ours) in enumerate(zip(groups, optimizer.param_groups)):
            if len(group["params"]) != len(ours["params"]):
                raise ValueError(f"group {i} holds {len(group['params'])} parameters, the model's {len(ours['params'])}")
            params.update(zip(group["params"], ours["params"]))
        for index, values in state.items():
            if index not in params:
                raise ValueError(f"state for parameter {index}, which no group holds")
            for key, value in values.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[index].shape:
                    raise ValueError(f"tensor state.{index}.{key} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(params[index].shape)}")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: the optimiser state is not one nanocausal saved ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: the optimiser state does not fit this model: {e}") from None


def load_plain(path, what, mmap=False):
    """torch.load(weights_only=True) of a file of tensors and plain types; anything else (a
    pickled object: code would run) is refused in one line naming the file. mmap: tensors are
    read from disk only when touched."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        reason = "it holds objects other than tensors and plain types" if "Weights only load failed" in str(e) \
            else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not {what} nanocausal can read safely ({reason})") from None
