"""Nothing lost, nothing executed: a training run killed with SIGKILL at any point of a save, or at
a random moment, resumes and ends with the same weights as an uninterrupted run; a diverging run
stops without overwriting its last good checkpoint; an out-dir holding a run is never clobbered
by accident, nor resumed with settings that change it. The kills use the fault-injection points
of nanocausal.checkpoint.save_checkpoint (NANOCAUSAL_CRASH_AT) on the real script."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script, tiny_examples, write_jsonl
from nanocausal import checkpoint
from nanocausal.checkpoint import load_model
from nanocausal.sft import SFTConfig, train_sft

SAVE_POINTS = ("weights", "trainer_state", "manifest", "moved_old", "moved_new", "removed_old")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("crash") / "sft.jsonl", tiny_examples(8))


def sft_args(model, data, out_dir, steps=4):
    return ["--model", model, "--data", data, "--out-dir", out_dir, "--device", "cpu", "--steps", steps,
            "--batch-size", 2, "--lr", 1e-3, "--warmup-steps", 1, "--save-every", 1, "--eval-every", 0]


def final_weights(out_dir):
    return load_model(os.path.join(out_dir, "checkpoint")).state_dict()


def assert_same_weights(a, b):
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_model, sft_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, out_dir))
    return final_weights(out_dir), [json.loads(line)["loss"] for line in open(out_dir / "metrics.jsonl")]


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_killed_at_each_point_of_a_save_then_resumed(tiny_chat_model, sft_data, uninterrupted, tmp_path, point):
    args = sft_args(tiny_chat_model, sft_data, tmp_path)
    killed = run_script("train_sft.py", *args, check=False, env={"NANOCAUSAL_CRASH_AT": f"{point}:2"})  # the 2nd save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_script("train_sft.py", *args, "--resume")
    weights, losses = uninterrupted
    assert_same_weights(weights, final_weights(tmp_path))
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == losses
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.jsonl"]  # no .tmp / .old left behind


def test_ten_kills_at_random_moments(tiny_chat_model, sft_data, tmp_path):
    """Killed ten times at random moments (loading, a step, a save), resumed each time: the run ends
    as an uninterrupted one does."""
    run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, tmp_path / "whole", steps=60))
    command = [sys.executable, str(ROOT / "train_sft.py"),
               *map(str, sft_args(tiny_chat_model, sft_data, tmp_path / "killed", steps=60)), "--resume"]
    rng, kills, deadline = random.Random(0), 0, time.time() + 240
    while kills < 10 and time.time() < deadline:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))  # loading takes a few seconds, a step and its save a fraction of one
        if process.poll() is not None:
            break  # it finished before the kill
        process.kill()
        process.wait()
        kills += 1
    assert kills >= 5, kills
    run_script("train_sft.py", *command[2:])
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed"))


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_chat_model, sft_data, tmp_path):
    # (At lr 1e6 this tiny model's gradients die at 0 instead; at 1e20 its loss is NaN from step 2.)
    out = run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, tmp_path, steps=30), "--lr", 1e20,
                     "--warmup-steps", 0, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "not finite for 3 steps in a row" in out.stderr.strip().splitlines()[-1]
    model = load_model(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert checkpoint.is_complete(tmp_path / "checkpoint") and checkpoint.saved_step(tmp_path / "checkpoint") == 1


def test_an_out_dir_holding_a_run_needs_resume_or_overwrite(tiny_chat_model, sft_data, tmp_path):
    config = dict(model=str(tiny_chat_model), data=str(sft_data), out_dir=str(tmp_path), device="cpu", steps=2,
                  batch_size=2, eval_every=0)
    train_sft(SFTConfig(**config))
    with pytest.raises(ValueError, match="already holds a run .* --resume .* --overwrite"):
        train_sft(SFTConfig(**config))
    with pytest.raises(ValueError, match=r"other settings than the run .*lr 1e-05 -> 0\.001, batch_size 2 -> 4"):
        train_sft(SFTConfig(**{**config, "lr": 1e-3, "batch_size": 4, "steps": 3, "resume": True}))
    resumed = train_sft(SFTConfig(**{**config, "steps": 3, "resume": True}))  # more steps: the same run, longer
    assert resumed.steps == 3
    assert train_sft(SFTConfig(**{**config, "overwrite": True})).steps == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_sampling_a_broken_model_is_a_clear_error(tiny_chat_model):
    from nanocausal.refill import generate_many
    from nanocausal.sampling import generate
    model = load_model(tiny_chat_model)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    for sampler in (generate, generate_many):
        with pytest.raises(ValueError, match="logits are NaN or inf"):
            sampler(model, [[1, 2, 3]], 4)
