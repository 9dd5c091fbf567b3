"""Bad input, as a user types it, gets one line on stderr naming the flag, file, line or key (no
traceback), a non-zero exit, and nothing written: the probes of issue #26, each run as a real
script in a subprocess."""
import json
import math
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_script, write_jsonl

from nanocausal import cli, data, memory_plan
from nanocausal.offline import PreferenceConfig, SFTConfig
from nanocausal.rl import RLConfig


def refused(out, *named):
    """The process failed with exactly one line of stderr (beside a cleared progress bar) that
    names everything in `named`."""
    lines = [line for line in out.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert out.returncode != 0, out.stdout[-2000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def run_problems(*args):
    return subprocess.run([sys.executable, "-m", "nanocausal.problems", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("script, flag, value", [
    ("train_rl.py", "--temperature", "inf"), ("train_rl.py", "--top-p", "2"), ("train_rl.py", "--top-p", "0"),
    ("train_rl.py", "--format-weight", "nan"), ("train_rl.py", "--eps-low", "5"),
    ("train_pref.py", "--label-smoothing", "5"), ("train_sft.py", "--min-lr-ratio", "5"),
    ("train_sft.py", "--weight-decay", "inf"), ("train_sft.py", "--lora-alpha", "inf"),
    ("train_sft.py", "--seed", "-1"), ("train_sft.py", "--seed", str(2**70)), ("train_sft.py", "--device", "tpu"),
    ("eval.py", "--top-p", "2"), ("eval.py", "--temperature", "nan"),
    ("train_rl.py", "--entropy-coef", "inf"), ("train_rl.py", "--top-entropy-quantile", "0"),
])
def test_bad_numbers_are_refused_by_the_flag(tmp_path, script, flag, value):
    args = ["--model", "oracle", "--data", "tiny:2"] if script == "eval.py" else ["--model", tmp_path / "none"]
    out = run_script(script, *args, flag, value, "--out" if script == "eval.py" else "--out-dir", tmp_path / "out",
                     check=False)
    assert refused(out, f"argument {flag}", value).startswith(f"{script}: error:")
    assert not (tmp_path / "out").exists()


def test_ppo_gae_lambda_over_one_is_refused():
    refused(run_script("train_rl.py", "--algo", "ppo", "--lam", "5", "--plan", check=False), "--lam", "[0, 1]")


@pytest.mark.parametrize("args, named", [
    (["--n", "-3"], "--n"), (["--questions-per-model", "0"], "--questions-per-model"),
    (["--questions-per-model", "-2"], "--questions-per-model"), (["--zero-share", "2"], "--zero-share"),
    (["--seed", "-1"], "--seed"), (["--nodes", "1-40"], "--nodes"),
])
def test_problem_generator_flags(args, named):
    refused(run_problems(*args), named)


def test_number_types_accept_their_range_and_the_configs_check_the_same():
    assert cli.top_p("1") == 1.0 and cli.probability("0") == 0.0 and cli.finite_float("-2.5") == -2.5
    assert cli.seed(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(ValueError, match=r"--min-lr-ratio must be a finite number in \[0, 1\], got 5"):
        SFTConfig(device="cpu", min_lr_ratio=5)
    with pytest.raises(ValueError, match=r"--top-p must be a finite number in \(0, 1\], got 1.5"):
        RLConfig(device="cpu", top_p=1.5)
    with pytest.raises(ValueError, match="--temperature"):
        RLConfig(device="cpu", temperature=math.inf)
    with pytest.raises(ValueError, match="--seed"):
        SFTConfig(device="cpu", seed=-1)
    with pytest.raises(ValueError, match="--device"):
        SFTConfig(device="tpu")
    with pytest.raises(ValueError, match=r"--beta must be > 0 with --loss-type ipo"):
        PreferenceConfig(device="cpu", loss_type="ipo", beta=0.0)
    PreferenceConfig(device="cpu", loss_type="ipo", beta=0.1)  # the same run with a usable beta is accepted


def test_ipo_with_beta_zero_is_one_line(tmp_path):
    out = run_script("train_pref.py", "--model", tmp_path / "none", "--loss-type", "ipo", "--beta", "0",
                     "--out-dir", tmp_path / "out", check=False)
    refused(out, "--beta", "--loss-type ipo")


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tiny_chat_model, tmp_path):
    if memory_plan.device_problem("cuda") is None:
        pytest.skip("this machine has a GPU")
    out = run_script("train_sft.py", "--model", tiny_chat_model, "--device", "cuda", "--out-dir", tmp_path / "out",
                     check=False)
    refused(out, "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "out").exists()
    out = run_script("eval.py", "--model", tiny_chat_model, "--data", "tiny:2", "--device", "cuda",
                     "--out", tmp_path / "eval", check=False)
    refused(out, "--device cuda")
    assert not (tmp_path / "eval").exists()


def test_runs_that_cannot_fit_in_memory_name_their_flag(tiny_chat_model, tmp_path):
    out = run_script("train_rl.py", "--model", tiny_chat_model, "--device", "cpu", "--prompts-per-step", 1000000,
                     "--out-dir", tmp_path / "rl", check=False)
    refused(out, "kv_cache", "--prompts-per-step", "GiB is available")
    out = run_script("train_sft.py", "--model", tiny_chat_model, "--device", "cpu", "--lora-rank", 1000000,
                     "--out-dir", tmp_path / "sft", check=False)
    refused(out, "--lora-rank", "GiB is available")
    assert not (tmp_path / "rl").exists() and not (tmp_path / "sft").exists()


def test_fit_check_counts_the_plans_exact_bytes(tiny_chat_model, monkeypatch):
    config = RLConfig(model=str(tiny_chat_model), device="cpu", prompts_per_step=4, group_size=2, max_new_tokens=8)
    plan = memory_plan.plan(config, "grpo")["bytes"]
    resident = plan["weights"] + plan["optimizer"]
    training_phase = resident + plan["gradients"] + plan["optimizer_temporaries"]  # (activations, logits: real lengths)
    generation_phase = resident + plan["kv_cache"] + plan["prefill_cache"]
    needed = max(training_phase, generation_phase)
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: needed)
    memory_plan.check_fits(config, "grpo")  # exactly enough: accepted
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device: needed - 1)
    with pytest.raises(ValueError, match="GiB is available"):
        memory_plan.check_fits(config, "grpo")


BAD_FILES = {
    "deep.jsonl": ("[" * 100_000 + "]" * 100_000 + "\n").encode(), "latin1.jsonl": b'{"prompt": "caf\xe9", "completion": "x"}\n',
    "dict_content.jsonl": json.dumps({"prompt": [{"role": "user", "content": {"a": 1}}], "completion": "x"}).encode() + b"\n",
}


@pytest.mark.parametrize("name, named", [("deep.jsonl", "deep.jsonl:1: JSON nested too deeply"),
                                         ("latin1.jsonl", "latin1.jsonl: not UTF-8"),
                                         ("dict_content.jsonl", "dict_content.jsonl:1: field 'prompt'")])
def test_malformed_data_files_name_file_and_line(tiny_chat_model, tmp_path, name, named):
    (tmp_path / name).write_bytes(BAD_FILES[name])
    out = run_script("train_sft.py", "--model", tiny_chat_model, "--device", "cpu", "--data", tmp_path / name,
                     "--out-dir", tmp_path / "out", check=False)
    refused(out, named)
    assert not (tmp_path / "out").exists()


def test_a_gold_answer_that_is_not_answer_json_is_refused_at_load(tiny_chat_model, tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "q1", "answer": '{"PROB": "0.5"}'},
                                               {"prompt": "q2", "answer": "0.5 maybe"}])
    with pytest.raises(ValueError, match=r"rl.jsonl:2: field 'answer' must be"):
        data.load_examples(path, "rl")
    out = run_script("train_rl.py", "--model", tiny_chat_model, "--device", "cpu", "--data", path,
                     "--max-new-tokens", 16, "--out-dir", tmp_path / "out", check=False)
    refused(out, "rl.jsonl:2", "'answer'")
    out = run_script("eval.py", "--model", "oracle", "--data", path, "--out", tmp_path / "eval", check=False)
    refused(out, "rl.jsonl:2")
    assert not (tmp_path / "eval").exists()
    for answer in ("LACK_CONDITION", '{"ANSWER": "Yes", "PROB": "0.1234"}'):
        data.check_answer(answer)  # the two forms the official rule scores
    with pytest.raises(ValueError, match="not a finite number"):
        data.check_answer('{"PROB": "nan"}')


def test_an_eval_prompt_longer_than_the_context_is_refused_with_its_line_before_writing(tiny_chat_model, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "answer": '{"PROB": "0.5"}', "type": "ATE"},
                                                 {"prompt": "word " * 400, "answer": '{"PROB": "0.5"}', "type": "ATE"}])
    out = run_script("eval.py", "--model", tiny_chat_model, "--data", path, "--device", "cpu",
                     "--out", tmp_path / "eval", check=False)
    refused(out, "long.jsonl:2", "context is 256")
    assert not (tmp_path / "eval").exists()


def test_a_refused_eval_leaves_the_corrected_rerun_free(tmp_path):
    out = tmp_path / "eval"
    refused(run_script("eval.py", "--model", "oracle", "--data", "tiny:4", "--top-p", "2", "--out", out,
                       check=False), "--top-p")
    assert not out.exists()
    run_script("eval.py", "--model", "oracle", "--data", "tiny:4", "--top-p", "0.9", "--out", out)
    again = run_script("eval.py", "--model", "oracle", "--data", "tiny:4", "--top-p", "0.9", "--out", out)
    assert "resuming: 4 problems already answered" in again.stdout


def broken_copy(tiny_chat_model, tmp_path, name, content):
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_model, folder)
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("name, content, named", [
    ("tokenizer.json", b"{not json", "tokenizer.json: not a valid tokenizer.json"),
    ("tokenizer_config.json", b'{"eos_token": "\xff"}', "tokenizer_config.json: not UTF-8"),
    ("chat_template.jinja", b"{% for x in %}", "chat_template.jinja: chat template line 1"),
    ("chat_template.jinja", b"{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "more than 1,000,000 operations"),
    ("chat_template.jinja", b"{{ 'x' * 10**10 }}", "more than 50,000,000 characters"),
])
def test_broken_tokenizer_files_name_the_file(tiny_chat_model, tmp_path, name, content, named):
    model = broken_copy(tiny_chat_model, tmp_path, name, content)
    out = run_script("train_sft.py", "--model", model, "--device", "cpu", "--num-train", 4, "--batch-size", 2,
                     "--out-dir", tmp_path / "out", check=False)
    refused(out, named, name)


@pytest.mark.parametrize("flags, named", [
    (["--max-new-tokens", 1024], "--max-new-tokens 1024 leaves no room for a prompt"),  # tiny-base: 512 positions
    (["--max-new-tokens", 100], "item 8: prompt is 465 tokens, no room left in the context of 412"),  # CauGym prompts
    (["--rewards", "correct,format", "--reward-weights", "1,nan"], "--reward-weights 1,nan"),
])
def test_rl_prompts_and_rewards_are_checked_before_the_run_writes(tmp_path, flags, named):
    """The generated prompts (their first chunk) and the reward weights are checked before the run
    creates its out-dir: the corrected command then starts without --overwrite."""
    out = run_script("train_rl.py", "--model", ROOT / "data" / "tiny-base", "--device", "cpu", *flags,
                     "--out-dir", tmp_path / "out", check=False)
    refused(out, named)
    assert not (tmp_path / "out").exists()


def test_eval_of_a_folder_without_weights_writes_nothing(tmp_path):
    """A checkpoint someone else made (config and tokenizer, weights only as pytorch_model.bin) is
    refused when it loads, before eval creates --out; an --out that is a file is refused by name."""
    folder = tmp_path / "foreign"
    shutil.copytree(ROOT / "data" / "tiny-base", folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(folder / "pytorch_model.bin")
    out = run_script("eval.py", "--model", folder, "--data", "tiny:2", "--device", "cpu", "--out", tmp_path / "out",
                     check=False)
    refused(out, str(folder), "no model.safetensors")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    refused(run_script("eval.py", "--model", "oracle", "--data", "tiny:2", "--out", tmp_path / "file", check=False),
            f"{tmp_path / 'file'} exists and is not a folder")
