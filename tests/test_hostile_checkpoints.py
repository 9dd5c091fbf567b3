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
    assert out.stderr.count("\n") == 1 and "trainer_state.pt: not a trainer state nanocausal can read" in out.stderr


if __name__ == "__main__":  # the 2-rank worker of test_no_payload_runs_on_a_two_rank_resume
    distributed.setup("cpu")
    results = hostile_resumes(sys.argv[1], sys.argv[2], distributed.world_size())
    if distributed.is_main():
        with open(os.path.join(sys.argv[2], "outcomes.json"), "w") as f:
            json.dump(results, f, indent=1)
    distributed.teardown()
