"""Checkpoints someone else wrote (issue #26, part A): resuming never runs code planted in any file
of a 1-rank or a 2-rank checkpoint, a bit flip in a file of the right size is caught by the
manifest's SHA-256, crafted safetensors (overlapping or negative byte ranges, an index naming
files outside the folder, integer weights) and crafted JSON (not UTF-8, nested 100 000 deep) are
refused in one line naming the file, an optimiser tensor of the wrong shape is named, and a full
disk during a save is one OSError with the previous checkpoint kept.

Run as a script under torchrun, this file is also the 2-rank worker (`hostile_resumes`):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/test_hostile_checkpoints.py MODEL WORK
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from nanocausal import checkpoint, distributed

# Files that hold no checkpoint data today but that an older format or another tool would read
# with pickle: a planted one must be ignored or refused, never unpickled.
PLANTED = [".metadata", "__0_0.distcp", "pytorch_model.bin", "optimizer.pt"]


class Payload:
    """Unpickling this creates `marker`: the probe's stand-in for running arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(name, path, marker):
    """Replace `path` by a payload: a torch.save zip for .pt/.bin (what torch.load expects), a raw
    pickle stream for everything else (what pickle.load, and DCP's .metadata reader, expect)."""
    if name.endswith((".pt", ".bin")):
        torch.save(Payload(marker), path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


def resign(folder, name):
    """Record `name`'s new size and SHA-256 in the manifest, as an attacker who can write the
    folder would: the payloads must be refused by the readers, not only by the hash check."""
    manifest_path = os.path.join(folder, checkpoint.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    if name in manifest["files"]:
        manifest["files"][name] = os.path.getsize(os.path.join(folder, name))
        manifest["sha256"][name] = checkpoint.file_sha256(os.path.join(folder, name))
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)


def train_and_save(model_dir, ckpt, ranks):
    """One AdamW step on a tiny model, saved as training.train saves it (1 rank: trainer_state.pt
    holds the optimiser; N ranks: each rank's shard beside it)."""
    model = checkpoint.load_model(model_dir).train()
    if ranks > 1:
        distributed.shard(model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(12).reshape(2, 6)).square().mean().backward()
    optimizer.step()
    state = {"step": 1, "world_size": ranks}
    if ranks == 1:
        checkpoint.save_checkpoint(str(ckpt), model, model_dir, optimizer, state)
    else:
        distributed.save_checkpoint(str(ckpt), model, model_dir, optimizer, state)


def resume(folder, ranks):
    """What training.start_run and training.train read on --resume, in their order."""
    model = checkpoint.load_model(folder).train()
    if ranks > 1:
        distributed.shard(model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = checkpoint.load_trainer_state(folder, optimizer if ranks == 1 else None)
    if ranks > 1 or state.get("world_size", 1) > 1:
        distributed.load_shards(folder, state["world_size"], model, None, optimizer)
    return optimizer


def hostile_resumes(model_dir, work, ranks):
    """{poisoned file (or "none"): [outcome on each rank]}: for every file of a fresh checkpoint,
    and for the PLANTED names, a copy with that one file replaced by a payload (and re-signed),
    resumed. An outcome is "resumed" or the refusal's message."""
    ckpt = os.path.join(work, "checkpoint")
    marker = os.path.join(work, "MARKER")
    train_and_save(model_dir, ckpt, ranks)
    outcomes = {}
    for name in ["none"] + sorted(os.listdir(ckpt)) + PLANTED:
        trial = os.path.join(work, f"trial{name}")
        if distributed.is_main():
            shutil.copytree(ckpt, trial)
            if name != "none":
                plant(name, os.path.join(trial, name), marker)
                if name != checkpoint.MANIFEST:
                    resign(trial, name)
        distributed.barrier()
        try:
            resume(trial, ranks)
            outcome = "resumed"
        except ValueError as e:
            outcome = str(e)
        outcomes[name] = distributed.all_objects(outcome)
    return outcomes


def assert_safe(outcomes, marker, shards):
    assert not os.path.exists(marker)
    assert outcomes["none"] == ["resumed"] * len(outcomes["none"])  # the clean copy does resume
    for name, results in outcomes.items():
        for result in results:
            assert "\n" not in result, (name, result)
    # every file a resume reads was read, and refused, on every rank
    read = ["config.json", "model.safetensors", "trainer_state.pt", checkpoint.MANIFEST, *shards]
    for name in read:
        assert all(r != "resumed" for r in outcomes[name]), name
    for name in PLANTED[:2]:  # the old torch.distributed.checkpoint files are refused by name
        assert all(("torch.distributed.checkpoint" in r) == (len(shards) > 0) for r in outcomes[name]), (name, outcomes[name])


def test_the_payload_runs_when_unpickled(tmp_path):
    """The probe is armed: pickle.load and torch.load(weights_only=False) do create the marker."""
    for i, name in enumerate(["x.metadata", "x.pt"]):
        plant(name, tmp_path / name, tmp_path / f"marker{i}")
    pickle.loads((tmp_path / "x.metadata").read_bytes())
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "marker0").exists() and (tmp_path / "marker1").exists()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from conftest import make_hf_checkpoint
    path = tmp_path_factory.mktemp("hostile") / "model"
    make_hf_checkpoint(path, "qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    return path


def test_no_payload_runs_on_a_one_rank_resume(small_model, tmp_path):
    outcomes = hostile_resumes(str(small_model), str(tmp_path), 1)
    assert_safe(outcomes, tmp_path / "MARKER", shards=[])
    assert "trainer_state.pt: not a trainer state nanocausal can read safely" in outcomes["trainer_state.pt"][0]


def test_no_payload_runs_on_a_two_rank_resume(small_model, tmp_path):
    from conftest import ROOT
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               str(small_model), str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",  # this checkout's nanocausal, not an installed one
                              "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-4000:]
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())
    shards = [n for r in range(2) for n in distributed.shard_file_names(r)]
    assert_safe(outcomes, tmp_path / "MARKER", shards)
    # a shard of rank 1 stops rank 0 too, in one line, rather than leaving it in a collective
    assert "optimizer-rank1.json" in outcomes["optimizer-rank1.json"][1]
    assert "another rank could not read its optimiser shard" in outcomes["optimizer-rank1.json"][0]


def test_the_script_refuses_a_planted_trainer_state_in_one_line(tiny_chat_model, tmp_path):
    from conftest import run_script, tiny_examples, write_jsonl
    data = write_jsonl(tmp_path / "sft.jsonl", tiny_examples(4))
    args = ["--model", tiny_chat_model, "--data", data, "--out-dir", tmp_path / "run", "--device", "cpu", "--steps", 1,
            "--batch-size", 2, "--eval-every", 0]
    run_script("train_sft.py", *args)
    folder = tmp_path / "run" / "checkpoint"
    for name in ["trainer_state.pt", *PLANTED]:
        plant(name, folder / name, tmp_path / "MARKER")
    resign(folder, "trainer_state.pt")
    out = run_script("train_sft.py", *args, "--steps", 2, "--resume", check=False)
    assert out.returncode == 1 and not (tmp_path / "MARKER").exists()
    error = out.stderr.strip().splitlines()[-1]  # (above it: the tokenising progress bar)
    assert "Traceback" not in out.stderr and error.startswith("error: ") and \
        "trainer_state.pt: not a trainer state nanocausal can read safely" in error


# --- verified loading: a bit flip of the right size ----------------------------------------------


@pytest.fixture
def saved(small_model, tmp_path):
    """A 1-rank checkpoint of small_model after one step."""
    train_and_save(str(small_model), tmp_path / "checkpoint", 1)
    return tmp_path / "checkpoint"


def flip_bit(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "config.json"])
def test_a_flipped_bit_is_refused_on_resume_naming_the_file(saved, name):
    flip_bit(saved / name, 3 if name == "config.json" else 10)  # config.json: inside its last number or key
    assert checkpoint.is_complete(saved)  # crash recovery checks sizes only (a crash cuts files, it flips no bits)
    with pytest.raises(ValueError, match=rf"{name}: its bytes are not the ones saved \(SHA-256 differs"):
        resume(saved, 1)


def test_a_file_added_after_the_save_is_refused_when_read(saved):
    """A second weight file named by a planted index is not part of the saved checkpoint."""
    shutil.copy(saved / "model.safetensors", saved / "model-00002-of-00002.safetensors")
    (saved / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not part of the checkpoint that was saved"):
        checkpoint.load_model(saved)


def test_the_manifest_records_every_files_sha256(saved):
    manifest = json.loads((saved / checkpoint.MANIFEST).read_text())
    assert manifest["sha256"] == {n: checkpoint.file_sha256(saved / n) for n in manifest["files"]}
    assert sorted(manifest["files"]) == sorted(n for n in os.listdir(saved) if n != checkpoint.MANIFEST)


def test_a_manifest_without_sha256_is_checked_by_size(saved):
    """read_manifest accepts a manifest with no 'sha256' (sizes only): verify checks the sizes."""
    manifest = json.loads((saved / checkpoint.MANIFEST).read_text())
    del manifest["sha256"]
    (saved / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    checkpoint.verify(saved, ["model.safetensors", "trainer_state.pt"])


# --- crafted safetensors and JSON -------------------------------------------------------------------


def rewrite_header(file, change):
    """Rewrite a .safetensors file with change(header) applied (the data bytes kept as they are)."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_overlapping_and_negative_byte_ranges_are_refused(small_model, tmp_path):
    folder = shutil.copytree(small_model, tmp_path / "m")
    file = folder / "model.safetensors"
    original = file.read_bytes()
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"

    def alias(header):  # b's bytes are a's: writing one would change the other
        header[b]["data_offsets"] = header[a]["data_offsets"]
    rewrite_header(file, alias)
    with pytest.raises(ValueError, match=rf"model.safetensors .*tensors model.layers.0.\S+ and model.layers.0.\S+ share bytes"):
        checkpoint.load_model(folder)

    def before_the_data(header):  # the old check (end - begin == size, end inside the file) passed this
        begin, end = header[a]["data_offsets"]
        header[a]["data_offsets"] = [-8, end - begin - 8]
    file.write_bytes(original)
    rewrite_header(file, before_the_data)
    with pytest.raises(ValueError, match=rf"tensor {a}: offsets and shape must be non-negative integers"):
        checkpoint.load_model(folder)


def test_an_index_may_only_name_files_in_its_folder(small_model, tmp_path):
    folder = shutil.copytree(small_model, tmp_path / "m")
    shutil.copytree(small_model, tmp_path / "sibling")
    names = checkpoint.load_model(folder).state_dict().keys()
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    for target in ["../sibling/model.safetensors", "/etc/passwd", "sub/model.safetensors"]:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {checkpoint.hf_name(n): target for n in names}}))
        with pytest.raises(ValueError, match="which is not a .safetensors file name inside") as refused:
            checkpoint.load_model(folder)
        assert "root:" not in str(refused.value) and "\n" not in str(refused.value)


def test_file_contents_are_never_printed(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file") as refused:
        list(checkpoint.read_safetensors(tmp_path / "model.safetensors"))
    assert "root" not in str(refused.value).replace(str(tmp_path), "")


def test_integer_weights_for_a_float_parameter_are_refused(small_model, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = shutil.copytree(small_model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    key = "model.norm.weight"
    state[key] = torch.ones_like(state[key], dtype=torch.int32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor {key} holds int32 values; a weight must be a "
                                         rf"floating-point tensor"):
        checkpoint.load_model(folder)


@pytest.mark.parametrize("content, reason", [(b'{"hidden_size": "\xff\xfe"}', "not UTF-8 text"),
                                             (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply")])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "adapter_config.json"])
def test_unreadable_json_is_one_line_naming_the_file(small_model, tmp_path, name, content, reason):
    folder = shutil.copytree(small_model, tmp_path / "m")
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: {reason}") as refused:
        checkpoint.load_model(folder)
    assert "\n" not in str(refused.value)
    if name == "adapter_config.json":  # and fingerprint reads it too
        with pytest.raises(ValueError, match=rf"{name}: {reason}"):
            checkpoint.fingerprint(folder)


# --- the optimiser state and a full disk ------------------------------------------------------------


def test_an_optimiser_tensor_of_the_wrong_shape_is_named(saved):
    path = saved / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    moments = state["optimizer"]["state"][3]
    moments["exp_avg"] = moments["exp_avg"].reshape(-1)[:-1].clone()  # one element short
    torch.save(state, path)
    resign(saved, "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state.pt: the optimiser state does not fit this model: tensor "
                                         r"state.3.exp_avg has shape \(\d+,\), its parameter \([\d, ]+\)"):
        resume(saved, 1)


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_during_a_save_is_one_oserror_and_the_previous_checkpoint_stays(small_model, saved, monkeypatch,
                                                                                     writer):
    import safetensors.torch
    before = {n: (saved / n).read_bytes() for n in os.listdir(saved)}
    if writer == "torch":
        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4376")
        monkeypatch.setattr(torch, "save", full)
    else:
        def full(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              "message: \"No space left on device\" })")
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = checkpoint.load_model(small_model)
    with pytest.raises(OSError, match=rf"{saved}: the checkpoint could not be written \(.*(unexpected pos|No space "
                                      rf"left).*\); the previous checkpoint, if any, is kept") as refused:
        checkpoint.save_checkpoint(str(saved), model, str(small_model), torch.optim.AdamW(model.parameters()),
                                   {"step": 2})
    assert "\n" not in str(refused.value)
    assert {n: (saved / n).read_bytes() for n in os.listdir(saved)} == before
    assert not os.path.exists(f"{saved}.tmp")


if __name__ == "__main__":  # the 2-rank worker of test_no_payload_runs_on_a_two_rank_resume
    distributed.setup("cpu")
    results = hostile_resumes(sys.argv[1], sys.argv[2], distributed.world_size())
    if distributed.is_main():
        with open(os.path.join(sys.argv[2], "outcomes.json"), "w") as f:
            json.dump(results, f, indent=1)
    distributed.teardown()
