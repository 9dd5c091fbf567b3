"""
New tokens per second of nanocausal's generator (generate.generate_many, one slot per prompt:
the whole batch decodes together) against transformers' generate, measured in the same run on the
same weights (a benchmark, not a test: the numbers depend on the machine).

Laptop / CPU (about 5 minutes on 2 idle cores; much longer when other jobs share them):
    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --threads 1   # steadier on a shared machine, see below
        (a) a tiny Qwen2 with the real Qwen vocabulary (hidden 256, 4 layers, 4 heads / 2 KV heads,
            FFN 688, vocab 151,936, float32): 200-token prompts, 128 new tokens, batch 1 and 16,
            greedy and sampling (temperature 1, top_p 1);
        (b) SmolLM2-135M-Instruct at batch 16 (built by ../shared/tools/make_smollm2.py; skipped
            if the folder is missing).
One GPU (under 5 minutes; transformers not needed):
    python benchmarks/bench_sampling.py --gpu [--peak-bandwidth 4.8e12]
        a Qwen2.5-0.5B-shaped model with random bf16 weights: eager vs CUDA-graph decoding at batch
        1, 16 and 64, and the share of the GPU's memory bandwidth reached at batch 1.

Each configuration runs `--repeats` times, alternating the two implementations, and reports
the best run of each (the machine may be shared: the best run is the least disturbed one).
Both implementations always run with the same torch thread count. On a machine with more
runnable threads than cores, every OpenMP barrier waits for a descheduled thread, which made
2-thread timings swing by 5-10x between runs here; --threads 1 avoids that.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

from nanocausal.checkpoint import load_model
from nanocausal.model import ModelConfig, Transformer
from nanocausal.generate import generate_many

TINY_QWEN2 = dict(model_type="qwen2", vocab_size=151936, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_prompts(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def hf_generate(hf_model, prompts, new_tokens, temperature):
    ids = torch.tensor(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    hf_model.generation_config.eos_token_id = None  # both sides generate exactly new_tokens per row
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=0, **sampling)
    assert out.shape[1] == ids.shape[1] + new_tokens


def compare_cpu(name, model, hf_model, batch, prompt_len, new_tokens, temperature, repeats):
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: generate_many(model, prompts, new_tokens, slots=batch, temperature=temperature,
                                                seed=0), "cpu"))
        theirs.append(timed(lambda: hf_generate(hf_model, prompts, new_tokens, temperature), "cpu"))
    ours_tps, theirs_tps = batch * new_tokens / min(ours), batch * new_tokens / min(theirs)
    mode = "greedy" if temperature == 0 else f"sampling T={temperature}"
    print(f"{name:<22} batch {batch:>3} {mode:<16} nanocausal {ours_tps:8.1f} tok/s   transformers {theirs_tps:8.1f} tok/s"
          f"   ratio {ours_tps / theirs_tps:5.2f}x", flush=True)


def run_cpu(args):
    import transformers

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        config = transformers.Qwen2Config(**{k: v for k, v in TINY_QWEN2.items() if k != "model_type"})
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model = load_model(folder)
    for batch, temperature in [(1, 0.0), (1, 1.0), (16, 0.0), (16, 1.0)]:
        compare_cpu("tiny-qwen2 (V=151936)", model, hf_model, batch, args.prompt_len, args.new_tokens, temperature, args.repeats)
    if not os.path.isfile(os.path.join(args.smollm2, "config.json")):
        print(f"SmolLM2 skipped: {args.smollm2} has no config.json (build it with ../shared/tools/make_smollm2.py)")
        return
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=torch.float32).eval()
    model = load_model(args.smollm2)
    compare_cpu("SmolLM2-135M", model, hf_model, 16, args.prompt_len, args.new_tokens, 1.0, args.repeats)


def run_gpu(args):
    """Eager vs CUDA-graph decoding of a Qwen2.5-0.5B-shaped model with random bf16 weights."""
    device = "cuda"
    config = ModelConfig.from_dict(QWEN25_05B)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.reset_rope(device)  # .to(bfloat16) rounded the float32 buffer
    new_tokens = args.gpu_new_tokens
    for batch in (1, 16, 64):
        prompts = random_prompts(batch, args.prompt_len, config.vocab_size)
        results = {}
        for graph in (False, True):
            run = lambda n: generate_many(model, prompts, n, slots=batch, temperature=1.0, seed=0,  # noqa: E731
                                          use_cuda_graph=graph)
            run(8)  # warm-up: CUDA context, cuBLAS handles, allocator
            total = min(timed(lambda: run(new_tokens), device) for _ in range(args.repeats))
            first = min(timed(lambda: run(1), device) for _ in range(args.repeats))  # prefill + first token
            results[graph] = (batch * new_tokens / total, (total - first) / (new_tokens - 1))
        (eager_tps, eager_step), (graph_tps, graph_step) = results[False], results[True]
        print(f"Qwen2.5-0.5B shape bf16 batch {batch:>3}: eager {eager_tps:9.1f} tok/s ({eager_step * 1e3:6.2f} ms/step)"
              f"   CUDA graph {graph_tps:9.1f} tok/s ({graph_step * 1e3:6.2f} ms/step)   speed-up {graph_tps / eager_tps:4.2f}x",
              flush=True)
        if batch == 1:
            # Bytes a decode step must read: every weight matrix once (the tied embedding is read
            # whole by the output head) and the KV cache the graph attends over (all its slots).
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            slots = args.prompt_len + new_tokens
            kv_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * slots * config.head_dim * 2
            bandwidth = (weight_bytes + kv_bytes) / graph_step
            print(f"  batch 1 CUDA graph: {(weight_bytes + kv_bytes) / 1e6:.0f} MB per step / {graph_step * 1e3:.2f} ms = "
                  f"{bandwidth / 1e9:.0f} GB/s = {100 * bandwidth / args.peak_bandwidth:.0f}% of {args.peak_bandwidth / 1e12:.1f} TB/s",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmark (eager vs CUDA graph) instead of the CPU one")
    parser.add_argument("--smollm2", default=os.path.expanduser("~/.cache/nanocausal/smollm2-135m-instruct"),
                        help="SmolLM2-135M-Instruct folder for the CPU benchmark (b)")
    parser.add_argument("--prompt-len", type=int, default=200, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per row on CPU")
    parser.add_argument("--gpu-new-tokens", type=int, default=256, help="new tokens per row on GPU")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration and implementation (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-bandwidth", type=float, default=4.8e12,
                        help="the GPU's peak memory bandwidth in bytes/s (H200: 4.8e12, H100 SXM: 3.35e12, A100 80GB: 2.0e12)")
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
