"""
Useful tokens per second of continuous batching (generate.generate_many over a queue of prompts)
against static batches (generate_many on consecutive batches of `slots` rows: nothing to refill,
each batch decodes until its longest row ends) at the same number of rows, on replies with the long
tail of real ones.

Laptop / CPU (about 4 minutes on 2 cores, also when other jobs share them):
    python benchmarks/bench_refill.py
        a tiny Qwen2 with the real Qwen vocabulary (hidden 256, 4 layers, vocab 151,936, float32),
        64 prompts of 32-96 tokens, 8 slots, up to 160 new tokens, sampling at temperature 1.
One GPU (a few minutes):
    python benchmarks/bench_refill.py --gpu
        a Qwen2.5-0.5B-shaped model (bf16, CUDA graphs), 512 prompts of 128-384 tokens, 64 slots,
        up to 1024 new tokens.

The workload. Reply lengths are drawn from a log-normal (median --median-len, sigma --sigma: a
tail of a few replies many times the median, as reasoning models write) and capped at
--max-new-tokens (the replies beyond it stop by length, as truncated rollouts do). The lengths are
forced by the weights: the model is a "countdown", whose output head maps token k to token k - 1
(head row j = the embedding of j + 1, scaled; the blocks' weights are small, so they do not move
the argmax), with EOS = 0. A prompt that ends in token k gets the reply k-1, k-2, ..., 0: k
tokens. Every layer still does the full compute of its shape (dense matmuls do not care about the
values), so the time per token is that of a real model of this shape; only the replies mean
nothing. The countdown is so peaked (logit margins above 30) that sampling reproduces it, so both
sides produce the same replies, which the script checks for every prompt.

What is measured: the wall time of the whole call of each side, prefill, decode, sampling and
host loop, for the same prompts and replies; "useful tokens" are the reply tokens, EOS included.
The static side calls generate_many on consecutive batches of `slots` rows (slots // num_samples
prompts, with their indices as prompt_keys: the same random numbers as the refill side), so each
batch decodes until its longest row ends; each of its calls also pays once the transposed weight
copies (generate.cpu_weight_layout) that refill pays once in all. (Before issue 27 the static side
was a separate static-batch sampler, left-padded, which attended over the padding too.) Memory: the peak above the loaded model, of the process (RSS,
Linux's VmHWM reset between runs) on CPU, of torch's CUDA allocator on GPU. Each side runs
--repeats times, alternating; the figures are min / median / max over runs, the ratio the ratio
of medians. "schedule" gives the decode steps each side needs for these lengths, an upper bound
of the ratio (prefill and the per-step cost of attention are not in it).
"""

import argparse
import ctypes
import heapq
import math
import random
import statistics
import sys
import time

import torch

from nanocausal.model import ModelConfig, Transformer
from nanocausal.generate import generate_many

TINY_QWEN2 = dict(model_type="qwen2", vocab_size=151936, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN25_05B = dict(TINY_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
CPU_DEFAULTS = dict(prompts=64, slots=8, max_new_tokens=160, median_len=24, prompt_len=64)
GPU_DEFAULTS = dict(prompts=512, slots=64, max_new_tokens=1024, median_len=128, prompt_len=256)
EOS = 0


def countdown_model(shape, device, dtype, seed=0):
    """A model of the given shape whose greedy reply to a prompt ending in token k is k-1, ..., 0."""
    torch.manual_seed(seed)
    config = ModelConfig.from_dict(shape)
    with torch.device(device):
        model = Transformer(config).eval()
    C = config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # std 1/C: each block adds ~1/C per component to a residual of rms 1, argmax unmoved
                p.normal_(0.0, 1.0 / C)
        embed, head = model.embed_tokens.weight, model.lm_head.weight
        embed.normal_(0.0, 1.0)
        # logit of j = 3 * <e_{j+1} / |e_{j+1}|, h>: about 3 sqrt(C) for j = k - 1, about 3 N(0, 1) for the others
        head[:-1] = embed[1:] * (3.0 / embed[1:].norm(dim=-1, keepdim=True))
        head[-1] = 0.0
    model = model.to(dtype)
    model.reset_rope(device)  # .to(dtype) rounded the float32 buffer
    return model


def workload(args, vocab_size):
    """Prompts (random tokens ending in the reply length k) and the reply length of each."""
    rng = random.Random(args.workload_seed)
    prompts, lengths = [], []
    for _ in range(args.prompts):
        k = max(1, min(2 * args.max_new_tokens, round(math.exp(rng.gauss(math.log(args.median_len), args.sigma)))))
        n = rng.randint(args.prompt_len // 2, 3 * args.prompt_len // 2)
        prompts.append([rng.randrange(1, vocab_size) for _ in range(n - 1)] + [k])
        lengths.append(min(k, args.max_new_tokens))
    return prompts, lengths


def schedule(lengths, slots, n):
    """Decode steps of each side for these reply lengths: static (sum of each batch's longest row),
    refill (each row starts as soon as its group finds free slots, in input order)."""
    rows = [lengths[i] for i in range(len(lengths)) for _ in range(n)]
    per_batch = slots // n * n
    static = sum(max(rows[i:i + per_batch]) for i in range(0, len(rows), per_batch))
    free_at = [0] * slots
    for i in range(0, len(rows), n):
        starts = [heapq.heappop(free_at) for _ in range(n)]
        start = max(starts)  # a group waits for its n slots
        for length in rows[i:i + n]:
            heapq.heappush(free_at, start + length)
    return static, max(free_at)


class PeakMemory:
    """Peak memory of a block above its start, in MB: CUDA allocator, or process RSS (Linux VmHWM)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so that reusing it counts
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM, the peak RSS, to the current RSS
                self.start = self.status("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2 ** 20
        else:
            self.mb = None if self.start is None else (self.status("VmHWM") - self.start) / 2 ** 10

    @staticmethod
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # kB


def static_batches(model, prompts, args, **kw):
    """generate_many on consecutive batches of slots // num_samples prompts; the replies of all."""
    per_batch = args.slots // args.num_samples
    replies = []
    for i in range(0, len(prompts), per_batch):
        batch = prompts[i:i + per_batch]
        out = generate_many(model, batch, args.max_new_tokens, slots=len(batch) * args.num_samples, seed=args.seed,
                            prompt_keys=range(i, i + len(batch)), **kw)
        replies += out.completions()
    return replies


def run(args):
    device = "cuda" if args.gpu else "cpu"
    if not args.gpu:
        torch.set_num_threads(args.threads or torch.get_num_threads())
    shape = QWEN25_05B if args.gpu else TINY_QWEN2
    model = countdown_model(shape, device, torch.bfloat16 if args.gpu else torch.float32)
    prompts, lengths = workload(args, shape["vocab_size"])
    expected = [list(range(k - 1, k - 1 - n, -1)) for k, n in zip((p[-1] for p in prompts), lengths)]
    expected = [reply for reply in expected for _ in range(args.num_samples)]
    useful = sum(map(len, expected))
    check_every = args.check_every or (4 if args.gpu else 1)
    kw = dict(temperature=args.temperature, num_samples=args.num_samples, eos_token_ids=EOS, check_every=check_every)
    sides = {
        "static": lambda: static_batches(model, prompts, args, **kw),
        "refill": lambda: generate_many(model, prompts, args.max_new_tokens, slots=args.slots, seed=args.seed,
                                        **kw).completions(),
    }
    static_steps, refill_steps = schedule(lengths, args.slots, args.num_samples)
    sorted_lengths = sorted(lengths)
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} torch thread(s)"
    print(f"{where}: {'Qwen2.5-0.5B' if args.gpu else 'tiny Qwen2'}-shaped countdown model, "
          f"temperature {args.temperature}, check every {check_every} step(s)")
    print(f"workload: {len(prompts)} prompts x {args.num_samples} samples, prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, replies median {statistics.median(lengths):.0f} / mean "
          f"{statistics.mean(lengths):.1f} / p90 {sorted_lengths[int(0.9 * len(lengths))]} / max {max(lengths)} tokens "
          f"({sum(k >= args.max_new_tokens for k in lengths)} capped at {args.max_new_tokens}), {useful} useful tokens")
    print(f"schedule: {args.slots} rows, static {static_steps} decode steps, refill {refill_steps}: at most "
          f"{static_steps / refill_steps:.2f}x; rows busy with a useful token: static "
          f"{useful / (args.slots * static_steps):.0%}, refill {useful / (args.slots * refill_steps):.0%}", flush=True)

    warm_up = dict(kw, check_every=1)  # not timed: first-touch memory, MKL / cuBLAS set-up, CUDA context
    generate_many(model, prompts[:4], 8, slots=2, **warm_up)
    seconds, memory = {side: [] for side in sides}, {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, fn in sides.items():
            with PeakMemory(device) as peak:
                if args.gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                replies = fn()
                if args.gpu:
                    torch.cuda.synchronize()
                seconds[side].append(time.perf_counter() - start)
            memory[side].append(peak.mb)
            if replies != expected:
                wrong = next(r for r, (a, b) in enumerate(zip(replies, expected)) if a != b)
                sys.exit(f"{side}: row {wrong}'s reply is {replies[wrong][:8]}..., expected the countdown "
                         f"{expected[wrong][:8]}...: the workload is not what it claims")
    tps = {side: sorted(useful / s for s in seconds[side]) for side in sides}
    for side in sides:
        what = f"batches of {args.slots} rows" if side == "static" else f"a queue over {args.slots} slots"
        mem = [m for m in memory[side] if m is not None]
        mem_text = f"peak memory +{max(mem):.0f} MB" if mem else "peak memory n/a"
        print(f"{side} ({what}): useful tokens/s min {tps[side][0]:.1f} / median {statistics.median(tps[side]):.1f} / "
              f"max {tps[side][-1]:.1f} over {args.repeats} runs "
              f"({min(seconds[side]):.1f}-{max(seconds[side]):.1f} s), "
              f"{mem_text}", flush=True)
    print("outputs identical per prompt: yes (both sides gave every prompt its countdown reply)")
    ratios = [r / s for r, s in zip(seconds["static"], seconds["refill"])]
    print(f"per-run ratios: {' '.join(f'{x:.2f}x' for x in ratios)}")
    print(f"refill/static useful tokens/s: {statistics.median(tps['refill']) / statistics.median(tps['static']):.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA: a Qwen2.5-0.5B-shaped bf16 model, CUDA graphs")
    parser.add_argument("--prompts", type=int, help="prompts in the queue (default: 64 on CPU, 512 on GPU)")
    parser.add_argument("--slots", type=int, help="decode rows of both sides (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--max-new-tokens", type=int, help="cap of every reply (default: 160 on CPU, 1024 on GPU)")
    parser.add_argument("--median-len", type=float, help="median reply length (default: 24 on CPU, 128 on GPU)")
    parser.add_argument("--sigma", type=float, default=1.0, help="sigma of the log-normal reply lengths (the tail)")
    parser.add_argument("--prompt-len", type=int, help="mean prompt length; prompts span half to 1.5 times it "
                                                       "(default: 64 on CPU, 256 on GPU)")
    parser.add_argument("--num-samples", type=int, default=1, help="replies per prompt (a GRPO group; same reply here)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--check-every", type=int, default=0, help="decode steps between checks / refills, both sides "
                                                                   "(0: 1 on CPU, 4 on GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--workload-seed", type=int, default=0, help="seed of the prompts and reply lengths")
    args = parser.parse_args()
    for key, value in (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.slots < args.num_samples:
        parser.error("--slots must be >= --num-samples")
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    run(args)


if __name__ == "__main__":
    main()
