"""
The GPU check: in one command, what the CPU cannot show about the GPU path, measured on random-
weight models of real shape (benchmarks/configs/, copied from ../shared/configs: no hub access
needed) and written to one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json        # one GPU (an H200: a few minutes)
    python benchmarks/gpu_check.py --cpu-smoke                 # laptop: the same code at tiny shapes

What it measures (each row of the table printed at the end):
  1. logits on the device in bf16 and fp32 against the CPU fp32 reference (max abs difference);
  2. CUDA-graph decoding gives the same greedy tokens as eager decoding;
  3. the attention kernel that ran in prefill and in decode (the aten op the profiler saw:
     flash, efficient, cudnn or math), and that generation runs with SDPA restricted to the fused
     kernels (torch.nn.attention.sdpa_kernel: flash and memory-efficient only; it raises if the
     math fallback were needed);
  4. decode tokens/s at batch 1 and 64 for the 1.5B and 7B shapes, graph and eager, and the share
     of the memory bandwidth reached: bytes read per step (the bf16 weights + the KV cache so
     far) / step time, against the nominal HBM bandwidth (--hbm-tb-s, 4.8 for an H200) and
     against what a large device-to-device copy reaches here; and float32 master weights under
     bf16 autocast (generation reads their bf16 copies, sampling.compute_dtype_weights) against
     bf16 weights at batch 1: the same speed when no weight is cast per step;
  5. one GRPO step at 1.5B (full fine-tuning, bf16) and at 7B (LoRA rank 32, bf16): peak memory
     (torch.cuda.max_memory_allocated) against the memory plan (nanocausal.memory_plan), training
     tokens/s and MFU = 6 * parameters * training tokens / s / peak bf16 FLOP/s (--peak-tflops, 989).
On CPU (--cpu-smoke) the shapes are tiny, there is no graph, bandwidth or MFU (printed as -), and
the point is that every line of this file runs.
"""
import argparse
import json
import os
import tempfile
import time

import torch

from nanocausal import checkpoint, memory_plan
from nanocausal.rl import RLConfig, train_rl
from nanocausal.sampling import generate

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True}


def shape_file(name, smoke, scratch):
    """A config.json path: the real shape, or the tiny one for --cpu-smoke."""
    if not smoke:
        return os.path.join(HERE, "configs", f"{name}.json")
    path = os.path.join(scratch, "tiny.json")
    with open(path, "w") as f:
        json.dump(TINY, f)
    return path


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def logits_parity(config_path, device):
    reference = checkpoint.load_model(config_path)
    ids = torch.randint(0, reference.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).float()
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = checkpoint.load_model(config_path, dtype=dtype, device=device)
            out[str(dtype).removeprefix("torch.")] = (model(ids.to(device)).float().cpu() - expected).abs().max().item()
            del model
    return out


def attention_kernels(model, device):
    """The scaled-dot-product-attention ops the profiler saw in prefill and in decode."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device != "cpu" else [])
    prompts = [[1] * 32, [2] * 32]
    seen = {}
    for phase, new_tokens in (("prefill", 1), ("decode", 3)):
        with torch.profiler.profile(activities=activities) as prof:
            generate(model, prompts, new_tokens, temperature=0, use_cuda_graph=False)
        names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key.lower()}
        seen[phase] = sorted(n for n in names if n.startswith("aten::_scaled_dot_product") or "flash" in n or "fmha" in n)
    return seen


def fused_attention_only(model, device):
    """True when prefill and decode run with SDPA restricted to the flash and memory-efficient
    kernels (no math fallback); else the error's first line."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            generate(model, [[1] * 40, [2] * 33], 4, temperature=0, use_cuda_graph=False)
        return True
    except RuntimeError as e:
        return str(e).splitlines()[0]


def decode_speed(model, device, batch, new_tokens, graph):
    prompts = [[(7 * i + j) % 100 + 1 for j in range(128)] for i in range(batch)]
    generate(model, prompts, 4, temperature=0, use_cuda_graph=graph)  # warm-up
    sync(device)
    started = time.perf_counter()
    result = generate(model, prompts, new_tokens, temperature=0, use_cuda_graph=graph)
    sync(device)
    seconds = time.perf_counter() - started
    return result, batch * new_tokens / seconds, seconds / new_tokens


def copy_bandwidth(device):
    """Bytes/s of a 2 GiB device-to-device copy: the usable bandwidth."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * 10 * x.numel() / (time.perf_counter() - started)  # each copy reads and writes


def grpo_step(config_path, device, lora_rank, smoke, scratch):
    """One measured GRPO step (after one warm-up) on random prompts with a text-free reward."""
    config = RLConfig(model=config_path, out_dir=os.path.join(scratch, f"grpo-{lora_rank}"), device=device,
                      dtype="bfloat16", steps=2, prompts_per_step=2 if smoke else 16, group_size=4 if smoke else 8,
                      max_new_tokens=8 if smoke else 512, micro_batch_size=8, lr=1e-5, warmup_steps=0, eval_every=0,
                      save_every=1_000_000, lora_rank=lora_rank, activation_checkpointing=True)
    prompt_tokens = 16 if smoke else 256
    examples = [{"prompt_ids": [(i * 13 + j) % 200 + 1 for j in range(prompt_tokens)]} for i in range(64)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train_rl(config, reward_fn=lambda example, ids: float(sum(ids) % 2), examples=examples)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    planned = memory_plan.plan(config, "grpo", prompt_tokens=prompt_tokens)["total_bytes"]
    row = result.history[-1]
    parameters = sum(p.numel() for p in result.model.parameters())
    trained_tokens = row.get("training_tokens_per_s", 0.0)
    return {"peak_gib": peak / 2**30 if peak else None, "planned_gib": planned / 2**30,
            "peak_over_plan": peak / planned if peak else None, "training_tokens_per_s": trained_tokens,
            "step_s": row["step_s"], "mfu_flops": 6 * parameters * trained_tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check that everything runs")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON of every measurement goes")
    parser.add_argument("--hbm-tb-s", type=float, default=4.8, help="nominal memory bandwidth, TB/s (H200: 4.8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H200: 989)")
    parser.add_argument("--new-tokens", type=int, default=256, help="decode steps timed per speed measurement")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke on a machine without a GPU")
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    report, rows = {"device": torch.cuda.get_device_name() if not smoke else "cpu", "torch": torch.__version__}, []

    small = shape_file("DeepSeek-R1-Distill-Qwen-1.5B", smoke, scratch)
    report["logits_max_abs_diff"] = logits_parity(small, device)
    rows.append(("logits vs CPU fp32 (max |diff|)", " / ".join(f"{k} {v:.2e}" for k, v in report["logits_max_abs_diff"].items())))

    model = checkpoint.load_model(small, dtype=torch.bfloat16 if not smoke else torch.float32, device=device)
    eager, _, _ = decode_speed(model, device, 4, 16, graph=False)
    if not smoke:
        graphed, _, _ = decode_speed(model, device, 4, 16, graph=True)
        report["graph_tokens_equal_eager"] = bool(torch.equal(eager.tokens.cpu(), graphed.tokens.cpu()))
        rows.append(("CUDA-graph greedy tokens == eager", str(report["graph_tokens_equal_eager"])))
    report["attention_kernels"] = attention_kernels(model, device)
    rows.append(("attention kernel, prefill / decode", " / ".join(", ".join(v) or "?" for v in report["attention_kernels"].values())))
    report["fused_attention_only"] = fused_attention_only(model, device)
    rows.append(("generation with flash / efficient SDPA only", str(report["fused_attention_only"])))
    del model

    usable = copy_bandwidth(device) if not smoke else None
    report["copy_bandwidth_tb_s"] = usable / 1e12 if usable else None
    report["decode"] = {}
    for name in ("DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B"):
        path = shape_file(name, smoke, scratch)
        model = checkpoint.load_model(path, dtype=torch.bfloat16 if not smoke else torch.float32, device=device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        c = model.config
        per_token_kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
        for batch in (1, 64):
            for graph in ((False, True) if not smoke else (False,)):
                _, tokens_per_s, step_s = decode_speed(model, device, batch, args.new_tokens if not smoke else 8, graph)
                kv_read = batch * (128 + args.new_tokens / 2) * per_token_kv  # the average step's cache
                bandwidth = (weight_bytes + kv_read) / step_s
                key = f"{'tiny' if smoke else name} batch {batch} {'graph' if graph else 'eager'}"
                report["decode"][key] = {"tokens_per_s": tokens_per_s, "bytes_per_s": bandwidth,
                                         "hbm_share": None if smoke else bandwidth / (args.hbm_tb_s * 1e12),
                                         "usable_share": None if smoke else bandwidth / usable}
                share = "-" if smoke else f"{100 * bandwidth / (args.hbm_tb_s * 1e12):.0f} % of HBM"
                rows.append((f"decode {key}", f"{tokens_per_s:,.0f} tok/s, {share}"))
        del model
        if name.endswith("1.5B"):  # float32 master weights + bf16 autocast: decode reads the bf16 copies
            model = checkpoint.load_model(path, device=device)
            with torch.autocast(device, dtype=torch.bfloat16):
                _, tokens_per_s, _ = decode_speed(model, device, 1, args.new_tokens if not smoke else 8, not smoke)
            key = f"{'tiny' if smoke else name} batch 1 float32 weights + autocast"
            report["decode"][key] = {"tokens_per_s": tokens_per_s}
            rows.append((f"decode {key}", f"{tokens_per_s:,.0f} tok/s"))
            del model
        if smoke:
            break  # one tiny shape is enough to run the code

    report["grpo"] = {}
    for name, rank in (("DeepSeek-R1-Distill-Qwen-1.5B", 0), ("DeepSeek-R1-Distill-Qwen-7B", 32)):
        result = grpo_step(shape_file(name, smoke, scratch), device, rank, smoke, scratch)
        result["mfu"] = None if smoke else result.pop("mfu_flops") / (args.peak_tflops * 1e12)
        result.pop("mfu_flops", None)
        key = f"{'tiny' if smoke else name} {'LoRA r' + str(rank) if rank else 'full'} bf16"
        report["grpo"][key] = result
        peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.1f} GiB ({result['peak_over_plan']:.2f}x plan)"
        mfu = "-" if result["mfu"] is None else f"{100 * result['mfu']:.1f} %"
        rows.append((f"GRPO step {key}", f"peak {peak}, plan {result['planned_gib']:.2f} GiB, "
                                         f"{result['training_tokens_per_s']:,.0f} train tok/s, MFU {mfu}"))
        if smoke:
            break
        torch.cuda.empty_cache()

    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
