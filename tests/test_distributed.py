"""torchrun on CPU (gloo, 2 processes): the same command on 1 and 2 ranks trains the same run (SFT,
DPO, KTO, GRPO, PPO: per-step metrics within 1e-4 relative, final weights within 1e-5), a 2-rank
checkpoint is a Hugging Face folder one process (and transformers) loads, resuming on 2 ranks
continues exactly (SFT, PPO), Ctrl-C on one rank stops both after a checkpoint, and eval.py on 2 ranks writes
the responses of 1. Each test starts real processes, as a user does (nanocausal/distributed.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_hf_checkpoint, make_tiny_chat_model, run_script, tiny_examples, write_jsonl
from nanocausal import distributed
from nanocausal.checkpoint import load_model
from nanocausal.evaluation import read_responses

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

# What differs between a 1-rank and a 2-rank row: the rank count and the clock.
NOT_COMPARED = {"world_size", "time", "step_s", "tokens_per_s", "generation_s", "reward_s", "training_s",
                "generation_tokens_per_s", "training_tokens_per_s"}
# The workers import this checkout's nanocausal (tests/rl_worker.py runs from tests/, where an installed
# copy elsewhere would otherwise win) and use one thread each (2 ranks on 2 cores).
WORKER_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
              "OMP_NUM_THREADS": "1"}


def torchrun_command(script, nproc=2):
    """The command the README gives, with --standalone (one node, a free port) and N = nproc."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(ROOT / script)]


def torchrun(script, *args, nproc=2):
    out = subprocess.run(torchrun_command(script, nproc) + [str(a) for a in args], capture_output=True, text=True,
                         cwd=ROOT, env=WORKER_ENV)
    if out.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(one, two):
    """Same steps, every metric within 1e-4 relative, and the weights of the checkpoints within 1e-5."""
    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    assert {r["world_size"] for r in rows_one} == {1} and {r["world_size"] for r in rows_two} == {2}
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys()
        for key in a.keys() - NOT_COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = (dict(load_model(run / "checkpoint").named_parameters()) for run in (one, two))  # (LoRA: base + adapters)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model", max_positions=2048)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    good, wrong = tiny_examples(16, 0), tiny_examples(16, 100)
    return {
        "sft": write_jsonl(folder / "sft.jsonl", good),
        "dpo": write_jsonl(folder / "dpo.jsonl", [{"prompt": g["prompt"], "chosen": g["completion"],
                                                  "rejected": w["completion"]} for g, w in zip(good, wrong)]),
        "kto": write_jsonl(folder / "kto.jsonl", [{"prompt": g["prompt"], "label": i % 3 != 0,
                                                  "completion": g["completion"] if i % 3 else w["completion"]}
                                                 for i, (g, w) in enumerate(zip(good, wrong))]),
    }


def offline_args(model, data_file, out_dir, steps=3):
    # batch 3 x accumulation 2 = 6 examples a step, 3 per rank; --micro-batch-tokens cuts the shares
    # into different numbers of micro-batches on the two ranks (the zero-weight repeats at work)
    return ["--model", model, "--data", data_file, "--out-dir", out_dir, "--device", "cpu", "--steps", steps,
            "--batch-size", 3, "--grad-accum", 2, "--micro-batch-tokens", 120, "--lr", 1e-3, "--warmup-steps", 0,
            "--eval-every", 0, "--log-every", 100]


@pytest.mark.parametrize("algo", ["sft", "dpo", "kto", "dpo-lora"])
def test_offline_trainers_on_two_ranks_equal_one(tiny_chat_model, datasets, tmp_path, algo):
    """dpo-lora: LoRA adapters in the FSDP units beside the frozen base, and the reference is the
    policy with its adapters off."""
    algo, lora = algo.removesuffix("-lora"), algo.endswith("-lora")
    script, extra = ("train_sft.py", []) if algo == "sft" else ("train_pref.py", ["--algo", algo])
    extra += ["--lora-rank", 4, "--lr", 1e-2] if lora else []
    if algo == "sft":  # and the periodic evaluation, sampled (each rank answers half the problems), and
        # activation checkpointing inside the FSDP units
        extra = ["--eval-every", 2, "--eval-problems", 3, "--eval-max-new-tokens", 3, "--eval-temperature", 1,
                 "--activation-checkpointing"]
    args = offline_args(tiny_chat_model, datasets[algo], tmp_path / "one") + extra
    run_script(script, *args)
    torchrun(script, *offline_args(tiny_chat_model, datasets[algo], tmp_path / "two"), *extra)
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.fixture(scope="module")
def rl_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "model"
    make_hf_checkpoint(path, "qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    return path


@pytest.mark.parametrize("algo", ["grpo", "ppo", "grpo-dynamic"])
def test_rl_on_two_ranks_equals_one(rl_model, tmp_path, algo):
    """GRPO and PPO with a learnable reward (tests/rl_worker.py: the real train_rl, token-id prompts):
    the same rollouts on both (per-prompt seeds), two mini-batches (the off-policy old log-probs;
    PPO's values and whitening over the whole batch), and the same update, value head included."""
    run_script("tests/rl_worker.py", rl_model, tmp_path / "one", algo, 3)
    torchrun("tests/rl_worker.py", rl_model, tmp_path / "two", algo, 3)
    rows = metrics(tmp_path / "one")
    if algo == "grpo":
        assert any(0 < r["equal_reward_groups"] < 1 for r in rows)  # some groups had something to learn
    if algo == "grpo-dynamic":  # refill rounds happened, counted over both ranks' groups
        assert any(r["sampling_rounds"] > 1 for r in rows) and all(r["prompts_drawn"] == 8 * r["sampling_rounds"]
                                                                   for r in rows)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    if algo == "ppo":
        heads = [load_file(tmp_path / run / "checkpoint" / "value_head.safetensors") for run in ("one", "two")]
        assert heads[0]["weight"].abs().sum() > 0
        torch.testing.assert_close(heads[1]["weight"], heads[0]["weight"], rtol=0, atol=1e-5)


def test_the_generation_copy_gathers_bf16_shards_and_equals_the_float32_gather_cast(rl_model, tmp_path):
    """The rollouts' copy of a sharded model casts each shard to bf16 before the all-gather (half the
    bytes of float32), and is exactly the float32 gather cast afterwards (the cast is per element)."""
    tmp_path.mkdir(exist_ok=True)
    torchrun("tests/rl_worker.py", rl_model, tmp_path, "copy")
    for rank in (0, 1):
        with open(tmp_path / f"copy-rank{rank}.json") as f:
            result = json.load(f)
        assert result["gathered_dtypes"] == ["torch.bfloat16"]
        assert len(result["equal"]) > 5 and all(result["equal"].values()), result["equal"]


def test_collectives_get_tensors_the_cuda_process_group_serves():
    """nccl reduces CUDA tensors only. A CUDA run's process group (distributed.BACKENDS["cuda"]),
    each backend replaced by PyTorch's fake one, which likewise refuses a tensor on a device it was
    not registered for: every collective helper the trainers call runs on it. (An nccl-only group,
    as before, fails at the first CPU scalar: checked first, so this test can fail.)"""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def fake(backend):
        return ",".join(f"{pair.split(':')[0]}:fake" for pair in backend.split(","))
    dist.init_process_group(fake("cuda:nccl"), store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(RuntimeError, match="device type cpu"):
            distributed.all_sum(1)
    finally:
        dist.destroy_process_group()
    dist.init_process_group(fake(distributed.BACKENDS["cuda"]), store=FakeStore(), rank=0, world_size=2)
    try:
        assert distributed.world_size() == 2
        distributed.all_sum(3), distributed.all_sum(torch.tensor(2.0)), distributed.all_max(4)
        distributed.pad_to_longest([1], None), distributed.all_cat(torch.ones(2))
        distributed.all_sums({"loss": torch.tensor(1.0)}, "cpu"), distributed.all_lists([1], [2])
    finally:
        dist.destroy_process_group()


def test_ppo_resumes_exactly_on_two_ranks(rl_model, tmp_path):
    """The optimiser shards of the policy and the value head (one sharded state), the data position
    and every rank's RNG come back: 2 steps, then --resume to 4, is the run of 4."""
    torchrun("tests/rl_worker.py", rl_model, tmp_path / "whole", "ppo", 4)
    torchrun("tests/rl_worker.py", rl_model, tmp_path / "resumed", "ppo", 2)
    torchrun("tests/rl_worker.py", rl_model, tmp_path / "resumed", "ppo", 4, "--resume")
    timing = NOT_COMPARED - {"world_size"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "whole")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "resumed")]
    for name in ("model.safetensors", "value_head.safetensors"):
        whole, resumed = (load_file(tmp_path / run / "checkpoint" / name) for run in ("whole", "resumed"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name


def test_two_rank_checkpoint_loads_in_one_process_and_resumes_exactly(tiny_chat_model, datasets, tmp_path):
    transformers = pytest.importorskip("transformers")
    constant = ["--min-lr-ratio", 1]  # the schedule does not depend on --steps, so 3 then 5 steps is one run of 5
    torchrun("train_sft.py", *offline_args(tiny_chat_model, datasets["sft"], tmp_path / "whole", steps=5), *constant)
    torchrun("train_sft.py", *offline_args(tiny_chat_model, datasets["sft"], tmp_path / "resumed", steps=3), *constant)
    torchrun("train_sft.py", *offline_args(tiny_chat_model, datasets["sft"], tmp_path / "resumed", steps=5), *constant,
             "--resume")
    assert metrics(tmp_path / "resumed") == [{**r, "time": s["time"], "step_s": s["step_s"], "tokens_per_s": s["tokens_per_s"]}
                                             for r, s in zip(metrics(tmp_path / "whole"), metrics(tmp_path / "resumed"))]
    folder = tmp_path / "resumed" / "checkpoint"
    whole = dict(load_model(tmp_path / "whole" / "checkpoint").named_parameters())
    for name, p in load_model(folder).named_parameters():
        assert torch.equal(p, whole[name]), name
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    ours = load_model(folder)(ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # one process cannot continue what two saved (their optimiser state is in two shards)
    out = run_script("train_sft.py", *offline_args(tiny_chat_model, datasets["sft"], tmp_path / "resumed", steps=6),
                     *constant, "--resume", check=False)
    assert out.returncode != 0 and "saved by 2 ranks" in out.stderr


def test_ctrl_c_on_one_rank_stops_both_after_a_checkpoint(tiny_chat_model, datasets, tmp_path):
    out_dir = tmp_path / "run"
    process = subprocess.Popen(torchrun_command("train_sft.py") + [str(a) for a in offline_args(
        tiny_chat_model, datasets["sft"], out_dir, steps=100000)] + ["--save-every", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=WORKER_ENV)
    metrics_path = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_path.is_file() and metrics_path.read_text().count("\n") >= 3):
        assert time.time() < deadline and process.poll() is None, "the run did not start"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "train_sft.py"], capture_output=True, text=True)
    rank1 = sorted(int(pid) for pid in workers.stdout.split())[-1]  # the rank started last
    os.kill(rank1, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    steps = metrics(out_dir)[-1]["step"]
    assert "stopped at step" in output and (out_dir / "checkpoint" / "manifest.json").is_file()
    with open(out_dir / "checkpoint" / "manifest.json") as f:
        assert json.load(f)["step"] == steps


@pytest.mark.parametrize("temperature", [0, 1])
def test_eval_on_two_ranks_writes_the_responses_of_one(tiny_chat_model, tmp_path, temperature):
    args = ["--model", tiny_chat_model, "--data", "tiny:9", "--max-new-tokens", 6, "--batch-size", 2, "--device", "cpu",
            "--temperature", temperature, "--num-samples", 2]
    run_script("eval.py", *args, "--out", tmp_path / "one")
    torchrun("eval.py", *args, "--out", tmp_path / "two")

    def responses(folder):  # as eval.py reads them back: a (problem, sample) answered twice counts once
        return sorted((r["key"], r["sample"], r["response"], r["correct"])
                      for r in read_responses(folder / "responses.jsonl"))
    one = responses(tmp_path / "one")
    assert len(one) == 9 * (1 if temperature == 0 else 2) and responses(tmp_path / "two") == one
    assert sorted(os.listdir(tmp_path / "two")) == ["nanocausal.lock", "responses.jsonl", "run.json", "summary.json"]
    with open(tmp_path / "one" / "summary.json") as f, open(tmp_path / "two" / "summary.json") as g:
        assert json.load(f)["accuracy"] == json.load(g)["accuracy"]
    # a killed 2-rank run: some problems in responses.jsonl, some only in rank 1's file (its last
    # line cut), the rest never answered; the rerun answers what is missing and folds it all
    lines = (tmp_path / "two" / "responses.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two" / "responses.jsonl").write_text("".join(lines[:len(lines) // 3]))
    (tmp_path / "two" / "responses-rank1.jsonl").write_text("".join(lines[len(lines) // 3:len(lines) // 2]) + '{"key": "cut')
    torchrun("eval.py", *args, "--out", tmp_path / "two")
    assert responses(tmp_path / "two") == one
    assert sorted(os.listdir(tmp_path / "two")) == ["nanocausal.lock", "responses.jsonl", "run.json", "summary.json"]
