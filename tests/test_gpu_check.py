"""benchmarks/gpu_check.py and benchmarks/roofline.py on the CPU: the check runs from a plain copy
of the repository with no install and a kill keeps every finished section; its --cpu-smoke runs
every section; the FLOP count equals torch's own count of the matmuls that run; the decode byte
count and the peaks from the device name; random_model's weights."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, run_script
from nanocausal import checkpoint, lora
from nanocausal.logprobs import token_logprobs
from nanocausal.model import ModelConfig, Transformer

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import roofline  # noqa: E402

SMALL = {"model_type": "qwen2", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "max_position_embeddings": 64,
         "tie_word_embeddings": True}


def test_the_check_runs_from_a_plain_copy_and_a_kill_keeps_its_finished_sections(tmp_path):
    # The tracked files only (as a fresh clone has them), no install, no PYTHONPATH: the script
    # must find the package of its own copy; killed once two sections are on disk, both stay there.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "repo"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen([sys.executable, str(copy / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["sections"]) >= 2:
                break
            time.sleep(0.05)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -9  # killed mid-run, not finished
    report = json.loads(out.read_text())  # valid JSON: every write was a whole file
    assert list(report["sections"])[:2] == ["environment", "logits_parity"], stderr.decode()[-2000:]
    environment, parity = report["sections"]["environment"], report["sections"]["logits_parity"]
    assert environment["status"] == parity["status"] == "ok"
    assert environment["result"]["package"] == str(copy / "nanocausal")  # this copy's code, not an installed one
    assert parity["result"]["float32"] == 0.0 and 0 < parity["result"]["bfloat16"] < 0.05  # one model, copied
    assert not list(tmp_path.glob("*.tmp"))


def test_the_cpu_smoke_runs_and_records_every_section(tmp_path):
    result = run_script("benchmarks/gpu_check.py", "--cpu-smoke", "--out", tmp_path / "check.json")
    sections = json.loads((tmp_path / "check.json").read_text())["sections"]
    assert list(sections) == [name for name, _, _ in gpu_check.SECTIONS]
    failed = {name: s.get("error") for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    results = {name: s["result"] for name, s in sections.items()}
    assert results["attention"]["prefill"] and results["attention"]["decode"]
    assert results["attention"]["fused_kernels_only"] is True
    assert results["graph_vs_eager"]["tokens_equal_at_same_widths"] is True
    assert set(results["pipeline_smoke"]["accuracy"]) == {"SFT", "SFT + GRPO"}
    for name in ("train_sft_cli", "train_rl_cli"):
        assert results[name]["returncode"] == 0
    assert results["grpo_1.5B_full"]["training_tflop"] > 0 and results["grpo_1.5B_full"]["planned_gib"] > 0
    assert "grpo_7B_lora_r32" in result.stdout


def test_a_section_that_fails_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    calls = []

    def broken(ctx):
        raise ValueError("shape (2, 3) is not (2, 4)\nsecond line")
    monkeypatch.setattr(gpu_check, "SECTIONS", [("broken", 1, broken), ("fine", 1, lambda ctx: calls.append(1) or ({"x": 1}, "ok")),
                                                ("too_long", 10**6, lambda ctx: calls.append(2))])
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu-smoke", "--out", str(tmp_path / "c.json")])
    monkeypatch.setattr(gpu_check.Context, "estimate", lambda self, seconds: seconds)  # as on a GPU
    monkeypatch.setattr(gpu_check.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "scratch"))
    threads = torch.get_num_threads()
    gpu_check.main()
    sections = json.loads((tmp_path / "c.json").read_text())["sections"]
    assert sections["broken"]["status"] == "error" and sections["broken"]["error"] == "ValueError: shape (2, 3) is not (2, 4)"
    assert sections["fine"] == {"status": "ok", "result": {"x": 1}, "seconds": sections["fine"]["seconds"]}
    assert sections["too_long"]["status"] == "skipped: budget" and calls == [1]
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rank, checkpointing", [(0, False), (0, True), (2, False), (2, True)])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "o_proj", "up_proj"), lora.TARGETS])
def test_training_flops_equal_the_matmuls_torch_runs(rank, checkpointing, targets):
    # torch's FlopCounterMode counts every mm / addmm of a real forward + backward of the GRPO loss's
    # log-probs; attention runs in SDPA, which it does not count on the CPU: the hand count's
    # attention term (4HD per query-key pair, x3 with backward, x4 recomputed) is taken out.
    config = ModelConfig.from_dict(SMALL)
    model = Transformer(config).init_weights(generator=torch.Generator().manual_seed(0))
    if rank:
        lora.add_lora(model, rank, targets=targets)
    model.train()
    model.gradient_checkpointing = checkpointing
    B, T, N = 3, 10, 4
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros(B, T, dtype=torch.long)
    completion[:, T - N:] = 1
    with FlopCounterMode(display=False) as counter:
        token_logprobs(model, ids, None, completion).sum().backward()
    attention = 2 * 4 * 4 * 6 * (4 if checkpointing else 3) * B * T * (T + 1) // 2
    assert roofline.training_flops(config, [(T, N)] * B, rank, targets, checkpointing) - attention == counter.get_total_flops()


def test_training_flops_by_hand():
    # C 4, F 6, H 2, K 1, D 2, L 1, V 10. W = 4*(2+2)*2 + 2*2*4 + 3*4*6 = 32 + 16 + 72 = 120.
    config = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "max_position_embeddings": 16, "tie_word_embeddings": True})
    # one row of 3 tokens, 2 of them completion; full fine-tuning: layers 6*3*120 = 2160,
    # attention 4*2*2 * 3 (with backward) * (1+2+3 pairs) = 288, head 8*2*4*10 = 640 (embedding: 0)
    assert roofline.training_flops(config, [(3, 2)]) == 2160 + 288 + 640
    # LoRA r1 on q (4 -> 4: 8 adapter weights) and down (6 -> 4: 10), checkpointing:
    # base 4*3*120 = 1440, adapters 6*3*18 = 324, recompute 2*3*(120 + 18 - 1*4) = 804 (down's B not rerun),
    # layer 0's q, k, v send nothing to the frozen embedding: - 2*3*(4*4*2 + 4*1) = -216,
    # attention 4*2*2 * 4 * 6 = 384, frozen head 6*2*4*10 = 480
    assert roofline.training_flops(config, [(3, 2)], 1, ("q_proj", "down_proj"), True) == \
        1440 + 324 + 804 - 216 + 384 + 480


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_bytes(tied):
    config = ModelConfig.from_dict({**SMALL, "tie_word_embeddings": tied})
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Transformer(config).parameters())
    table, rows = 40 * 16, 3 * 16  # vocab x hidden; batch 3 looks up 3 rows
    weights = parameters - (0 if tied else table) + rows  # tied: the head reads the whole table anyway
    cache = 3 * 100 * 2 * 2 * 2 * 6  # batch x width x layers x (k, v) x heads x head_dim
    assert roofline.decode_step_bytes(config, parameters, 3, 100) == 2 * weights + 2 * cache
    assert roofline.decode_step_bytes(config, parameters, 3, 100, 4, 2) == 4 * weights + 2 * cache


def test_the_peaks_come_from_the_device_name():
    assert roofline.from_device_name(roofline.PEAK_HBM_TB_S, "NVIDIA H100 80GB HBM3") == 3.35
    assert roofline.from_device_name(roofline.PEAK_HBM_TB_S, "NVIDIA H200") == 4.8
    assert roofline.from_device_name(roofline.PEAK_HBM_TB_S, "NVIDIA H100 PCIe") is None  # 2.0 TB/s: not assumed
    assert roofline.from_device_name(roofline.PEAK_BF16_TFLOPS, "NVIDIA A100-SXM4-80GB") is None


def test_random_model_is_made_in_its_dtype_with_the_weights_of_a_seed(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL))
    model = checkpoint.random_model(path, seed=3)
    expected = Transformer(ModelConfig.from_dict(SMALL)).init_weights(generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert model.lm_head.weight is model.embed_tokens.weight and not model.training
    bf16 = checkpoint.random_model(path, dtype=torch.bfloat16, seed=3)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and bf16.lm_head.weight is bf16.embed_tokens.weight
    assert torch.equal(bf16.inv_freq, expected.inv_freq) and bf16.inv_freq.dtype == torch.float32
