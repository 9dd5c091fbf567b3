"""Nothing lost, nothing executed: a training run killed with SIGKILL at any point of a save, or at
a random moment, resumes and ends with the same weights as an uninterrupted run; a diverging run
stops without overwriting its last good checkpoint; an out-dir holding a run is never clobbered
by accident, nor resumed with settings that change it. The kills use the fault-injection points
of nanocausal.checkpoint.save_checkpoint (NANOCAUSAL_CRASH_AT) on the real script."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script, tiny_examples, write_jsonl
from nanocausal import checkpoint, rundir
from nanocausal.checkpoint import load_model
from nanocausal.offline import SFTConfig, train_offline

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
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.jsonl", "nanocausal.lock"]  # no .tmp / .old left behind


def rows_of(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # (a line being written is not a row yet)


def wait_for_step(process, out_dir, step, timeout=300):
    """Wait until the running script has logged `step` in out_dir/metrics.jsonl (its update is done;
    its save, if any, is next); False if it exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(row.get("step", 0) >= step for row in rows_of(out_dir)):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_ten_kills_at_moments_chosen_from_progress(tiny_chat_model, sft_data, tmp_path):
    """Killed ten times (SIGKILL) and resumed each time: five times as soon as a chosen step appears
    in metrics.jsonl (mid-save or mid-step), five times at a chosen point of a chosen save
    (NANOCAUSAL_CRASH_AT). The moments come from the run's own progress, not the clock, so every
    kill lands on any machine. The run ends as an uninterrupted one does, log included."""
    run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, tmp_path / "whole", steps=60))
    command = [sys.executable, str(ROOT / "train_sft.py"),
               *map(str, sft_args(tiny_chat_model, sft_data, tmp_path / "killed", steps=60)), "--resume"]
    rng, kills = random.Random(0), []
    for i in range(10):
        done = max([row["step"] for row in rows_of(tmp_path / "killed")] + [0])
        env = dict(os.environ)
        if i % 2:  # self-kill at a save point of the n-th save of this process
            env["NANOCAUSAL_CRASH_AT"] = f"{rng.choice(SAVE_POINTS)}:{rng.randint(1, 3)}"
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2 == 0 and wait_for_step(process, tmp_path / "killed", done + rng.randint(1, 3)):
            process.kill()
        process.wait()
        kills.append(process.returncode)
    assert kills == [-signal.SIGKILL] * 10
    assert max(row["step"] for row in rows_of(tmp_path / "killed")) < 60  # the kills came before the end
    run_script("train_sft.py", *command[2:])
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed"))
    assert [row["loss"] for row in rows_of(tmp_path / "killed")] == [row["loss"] for row in rows_of(tmp_path / "whole")]


def test_sigterm_writes_a_checkpoint_then_exits_143(tiny_chat_model, sft_data, tmp_path):
    """SIGTERM (timeout, SLURM, Kubernetes) is a Ctrl-C: the step finishes, a checkpoint is written
    although --save-every is far away, and the status is 143 (the run is not finished)."""
    args = sft_args(tiny_chat_model, sft_data, tmp_path, steps=1000) + ["--save-every", 500]
    process = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_step(process, tmp_path, 3)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    last = rows_of(tmp_path)[-1]["step"]
    assert 3 <= last < 500 and checkpoint.saved_step(tmp_path / "checkpoint") == last
    assert f"stopped at step {last} (SIGTERM); checkpoint in" in stdout
    run_script("train_sft.py", *args, "--steps", last + 2, "--resume")
    assert [row["step"] for row in rows_of(tmp_path)] == list(range(1, last + 3))


def tiny_base_args(data, out_dir, *flags):
    return ["--model", ROOT / "data" / "tiny-base", "--data", data, "--out-dir", out_dir, "--device", "cpu",
            "--batch-size", 2, "--warmup-steps", 0, "--save-every", 1, "--eval-every", 0, *flags]


def test_lr_1e30_diverges_exits_1_and_moves_the_checkpoint_that_produced_the_nans_aside(sft_data, tmp_path):
    """Step 1 is finite and leaves finite weights of ~1e30 (AdamW's first step moves each weight by
    lr, whatever its gradient); step 2's loss on them is NaN. So the step-1 checkpoint is not good:
    it is moved aside and the run says no good checkpoint remains."""
    out = run_script("train_sft.py", *tiny_base_args(sft_data, tmp_path, "--steps", 30, "--lr", 1e30), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 4: loss was not finite for 3 steps in a row") and "weights of step 1" in last
    assert "checkpoint-000001-diverged" in last and "no good checkpoint remains" in last
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and math.isfinite(rows[0]["loss"])
    assert not any(math.isfinite(r["loss"]) for r in rows[1:])
    assert not os.path.exists(tmp_path / "checkpoint")
    weights = load_model(tmp_path / "checkpoint-000001-diverged").parameters()
    assert max(p.abs().max().item() for p in weights) == pytest.approx(1e30, rel=1e-6)


def test_a_non_finite_last_step_exits_1_and_lr_inf_is_refused_by_its_flag(sft_data, tmp_path):
    """The probe's `--lr inf` ended with exit 0 and no checkpoint. inf is now refused by the flag,
    before anything is written; the case behind it, a run whose last step is not finite, exits 1
    in one line: at lr 1e30 saved rarely, step 2 (the last) is NaN and nothing good was saved."""
    out = run_script("train_sft.py", *tiny_base_args(sft_data, tmp_path, "--steps", 2, "--lr", "inf"), check=False)
    assert out.returncode == 2 and "--lr" in out.stderr.strip().splitlines()[-1] and not os.listdir(tmp_path)
    out = run_script("train_sft.py", *tiny_base_args(sft_data, tmp_path, "--steps", 2, "--lr", 1e30, "--save-every",
                                                     500), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 2: loss was not finite at the end of the run")
    assert "no good checkpoint remains" in last and not os.path.exists(tmp_path / "checkpoint")


def test_a_resumed_run_takes_a_new_lr_and_divergence_leaves_the_last_good_checkpoint(sft_data, tmp_path):
    """--allow-changed-args --lr: the resumed run's steps use the new lr (logged). At 1e30 step 3
    is finite, its weights give NaNs: checkpoint (step 3) is moved aside and checkpoint-000002,
    kept by --keep 3, becomes checkpoint; --resume continues from it."""
    flags = tiny_base_args(sft_data, tmp_path, "--lr", 1e-3, "--min-lr-ratio", 1, "--keep", 3)
    run_script("train_sft.py", *flags, "--steps", 2)
    out = run_script("train_sft.py", *flags, "--steps", 9, "--resume", "--allow-changed-args", "--lr", 1e30,
                     check=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "step 6: loss was not finite for 3 steps in a row" in last and "weights of step 3" in last
    assert f"the last good checkpoint is {tmp_path / 'checkpoint'} (step 2" in last
    assert [(r["step"], r["lr"]) for r in rows_of(tmp_path)[:3]] == [(1, 1e-3), (2, 1e-3), (3, 1e30)]
    assert checkpoint.saved_step(tmp_path / "checkpoint") == 2
    assert checkpoint.saved_step(tmp_path / "checkpoint-000003-diverged") == 3
    run_script("train_sft.py", *flags, "--steps", 4, "--resume", "--allow-changed-args", "--lr", 2e-3)
    assert [(r["step"], r["lr"]) for r in rows_of(tmp_path)] == [(1, 1e-3), (2, 1e-3), (3, 2e-3), (4, 2e-3)]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-000002", "checkpoint-000003",
                                            "checkpoint-000003-diverged", "metrics.jsonl", "nanocausal.lock"]


def test_an_out_dir_holding_a_run_needs_resume_or_overwrite(tiny_chat_model, sft_data, tmp_path):
    config = dict(model=str(tiny_chat_model), data=str(sft_data), out_dir=str(tmp_path), device="cpu", steps=2,
                  batch_size=2, eval_every=0)
    train_offline(SFTConfig(**config))
    with pytest.raises(ValueError, match="already holds a run .* --resume .* --overwrite"):
        train_offline(SFTConfig(**config))
    with pytest.raises(ValueError, match=r"other settings than the run .*lr 1e-05 -> 0\.001, batch_size 2 -> 4"):
        train_offline(SFTConfig(**{**config, "lr": 1e-3, "batch_size": 4, "steps": 3, "resume": True}))
    resumed = train_offline(SFTConfig(**{**config, "steps": 3, "resume": True}))  # more steps: the same run, longer
    assert resumed.steps == 3
    assert train_offline(SFTConfig(**{**config, "overwrite": True})).steps == 2
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_trimming_the_log_on_resume_is_all_or_nothing(tmp_path, monkeypatch):
    """A resume drops the log lines after its checkpoint's step by writing a new file and swapping it
    in: killed before the swap, the log is whole. A line that is JSON but not an object is kept."""
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 2.0}\n', "[1]\n", '{"step": 3, "loss": 1.0}\n', '{"step": 4, "lo']
    path.write_text("".join(lines))

    def killed(src, dst):
        raise KeyboardInterrupt  # a kill between writing the kept lines and the swap

    with monkeypatch.context() as patch:
        patch.setattr(rundir.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            rundir.keep_metrics_until(str(path), 2)
    assert path.read_text() == "".join(lines)
    rundir.keep_metrics_until(str(path), 2)
    assert path.read_text() == lines[0] + lines[1]


def sft_config(model, data, out_dir, **fields):
    return SFTConfig(**{"model": str(model), "data": str(data), "out_dir": str(out_dir), "device": "cpu", "steps": 2,
                        "batch_size": 2, "eval_every": 0, "log_every": 1000, **fields})


def test_a_moved_or_respelt_run_resumes_and_a_model_with_other_content_is_refused(tiny_chat_model, sft_data, tmp_path,
                                                                                     monkeypatch):
    """Paths are compared by what they hold (checkpoint.fingerprint, saved with the checkpoint):
    a run copied elsewhere with its model and data, or named ./x instead of x, continues; the same
    path holding other weights is refused naming `model`, out_dir never matters."""
    shutil.copytree(tiny_chat_model, tmp_path / "a" / "model")
    shutil.copy(sft_data, tmp_path / "a" / "sft.jsonl")
    train_offline(sft_config(tmp_path / "a" / "model", tmp_path / "a" / "sft.jsonl", tmp_path / "a" / "run"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # moved, not copied: the saved paths name nothing now
    moved = train_offline(sft_config(tmp_path / "b" / "model", tmp_path / "b" / "sft.jsonl", tmp_path / "b" / "run",
                                 steps=3, resume=True))
    assert moved.steps == 3
    monkeypatch.chdir(tmp_path / "b")
    assert train_offline(sft_config("./model", "sft.jsonl", "./run", steps=4, resume=True)).steps == 4
    assert train_offline(sft_config("model", "./sft.jsonl", "run", steps=5, resume=True)).steps == 5
    assert [row["step"] for row in rows_of(tmp_path / "b" / "run")] == [1, 2, 3, 4, 5]
    model = load_model(tmp_path / "b" / "model")
    with torch.no_grad():
        model.embed_tokens.weight.add_(0.01)
    checkpoint.save_model(model, tmp_path / "b" / "model")
    with pytest.raises(ValueError, match=r"other settings than the run in run: model 'model' -> 'model' \(other content\)"):
        train_offline(sft_config("model", "sft.jsonl", "run", steps=6, resume=True))


def test_a_second_process_on_the_same_out_dir_is_refused_naming_the_first(tiny_chat_model, sft_data, tmp_path):
    """An exclusive fcntl lock on out-dir/nanocausal.lock for the run's life (eval.py: its --out);
    the one refused names the holder's pid. A kill -9 releases it (the kernel drops the lock)."""
    args = sft_args(tiny_chat_model, sft_data, tmp_path / "run", steps=1000) + ["--save-every", 500]
    first = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *map(str, args)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_step(first, tmp_path / "run", 1)
        second = run_script("train_sft.py", *args, "--resume", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"error: {tmp_path / 'run'} is in use by another process (pid {first.pid}, holding ")
        evaluation = run_script("eval.py", "--model", "oracle", "--data", "tiny:2", "--out", tmp_path / "run",
                                check=False)
        assert evaluation.returncode == 1 and f"in use by another process (pid {first.pid}" in evaluation.stderr
    finally:
        first.kill()
        first.wait()
    rundir.lock(tmp_path / "eval")  # this process holds an eval --out
    try:
        evaluation = run_script("eval.py", "--model", "oracle", "--data", "tiny:2", "--out", tmp_path / "eval",
                                check=False)
        assert evaluation.returncode == 1 and f"(pid {os.getpid()}, holding" in evaluation.stderr
    finally:
        rundir.release(tmp_path / "eval")
    run_script("train_sft.py", *args, "--steps", 2, "--resume")  # the killed run's lock went with it


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint"])
def test_symlinks_in_an_out_dir_are_refused(tiny_chat_model, sft_data, tmp_path, name):
    """Resuming would write through a symlinked metrics.jsonl (or checkpoint/) into its target."""
    train_offline(sft_config(tiny_chat_model, sft_data, tmp_path / "run"))
    os.rename(tmp_path / "run" / name, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "run" / name)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    out = run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, tmp_path / "run", steps=3), "--resume",
                     check=False)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'run' / name} is a symlink (to {tmp_path / 'elsewhere'})")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_nothing_is_created_or_cleared_before_the_run_can_start(tiny_chat_model, sft_data, tmp_path):
    """--overwrite clears the earlier run only once model, data and settings are known good; a run
    with a wrong --model creates no out-dir."""
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub id"):
        train_offline(sft_config(tmp_path / "no-such-model", sft_data, tmp_path / "new"))
    assert not os.path.exists(tmp_path / "new")
    train_offline(sft_config(tiny_chat_model, sft_data, tmp_path / "run"))
    before = (tmp_path / "run" / "metrics.jsonl").read_text(), checkpoint.saved_step(tmp_path / "run" / "checkpoint")
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub id"):
        train_offline(sft_config(tmp_path / "no-such-model", sft_data, tmp_path / "run", overwrite=True))
    bad_data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'completion'"):
        train_offline(sft_config(tiny_chat_model, bad_data, tmp_path / "run", overwrite=True))
    assert ((tmp_path / "run" / "metrics.jsonl").read_text(), checkpoint.saved_step(tmp_path / "run" / "checkpoint")) \
        == before


def test_lora_settings_cannot_change_on_resume(tiny_chat_model, sft_data, tmp_path):
    train_offline(sft_config(tiny_chat_model, sft_data, tmp_path / "full"))
    train_offline(sft_config(tiny_chat_model, sft_data, tmp_path / "lora", lora_rank=4))
    for out_dir, rank, saved in (("full", 4, 0), ("lora", 0, 4), ("lora", 8, 4)):
        for allow in (False, True):
            with pytest.raises(ValueError, match=rf"^--resume: the run in .*{out_dir} has lora_rank {saved}, not {rank}: "
                                                 r"LoRA settings and the algorithm cannot change on resume"):
                train_offline(sft_config(tiny_chat_model, sft_data, tmp_path / out_dir, steps=3, resume=True,
                                     lora_rank=rank, allow_changed_args=allow))
    out = run_script("train_sft.py", *sft_args(tiny_chat_model, sft_data, tmp_path / "full", steps=3), "--resume",
                     "--lora-rank", 4, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "lora_rank 0, not 4" in out.stderr


def test_sampling_a_broken_model_is_a_clear_error(tiny_chat_model):
    from nanocausal.generate import generate_many
    model = load_model(tiny_chat_model)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits are NaN or inf"):
        generate_many(model, [[1, 2, 3]], 4)
