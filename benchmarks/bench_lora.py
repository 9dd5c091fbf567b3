"""
Peak memory (and time) of a GRPO step with LoRA against full fine-tuning, in the same run, on a
model where it matters: SmolLM2-135M-Instruct (built by ../shared/tools/make_smollm2.py), float32.

    python benchmarks/bench_lora.py                          # laptop / CPU: a few minutes on 2 cores
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --new-tokens 256   # one GPU

The step: 4 CauGym prompts (base.json) x 4 completions of --new-tokens tokens, beta 0, one
optimiser step; the reward is an arbitrary function of the text, so every group carries a
gradient. Full fine-tuning holds the weights, their gradients and AdamW's two moments (4 x the
weights); LoRA (rank --rank on all seven linear layers of every block) holds the frozen weights
and the adapters' few parameters, gradients and moments. Each side runs in its own subprocess
(peak memory: ru_maxrss on CPU, torch.cuda.max_memory_allocated on a GPU), one warm-up step then
--steps timed steps, alternating --repeats times. It prints the peaks and the ratio LoRA / full.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def text_reward(example, ids):
    """Arbitrary but deterministic, in [0, 1], different for almost every completion."""
    return (sum(ids) % 97) / 96


def run_side(args):
    import torch

    from nanocausal import data
    from nanocausal.rl import RLConfig, train_rl
    from nanocausal.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(args.model)
    with open(os.path.join(SHARED, "data", "caugym", "base.json")) as f:
        items = json.load(f)[::175][:4]
    examples = data.tokenize([data.normalise({**it, "_where": "bench"}, "rl") for it in items], tokenizer, "rl",
                             progress=False)
    config = RLConfig(model=args.model, out_dir=tempfile.mkdtemp(prefix="bench_lora_"), device=args.device,
                      dtype=args.dtype, prompts_per_step=4, group_size=4, max_new_tokens=args.new_tokens,
                      micro_batch_size=16, lr=1e-5, warmup_steps=0, steps=args.steps + 1, eval_every=0,
                      save_every=1_000_000, lora_rank=args.rank if args.side == "lora" else 0)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from rl_worker import on_token_ids  # the prompts above and text_reward, in place of the causal ones
    on_token_ids(setattr, text_reward, examples)
    result = train_rl(config)
    if args.device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return {"step_s": [row["step_s"] for row in result.history[1:]], "peak_mib": peak_mib, "trainable": trainable}


def smollm2():
    out = subprocess.run([sys.executable, os.path.join(SHARED, "tools", "make_smollm2.py")], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"make_smollm2.py failed:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, built from ../shared)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per completion")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    parser.add_argument("--side", choices=("full", "lora"), help=argparse.SUPPRESS)  # internal: one side, here
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return
    model = args.model or smollm2()
    results = {"full": [], "lora": []}
    for repeat in range(args.repeats):
        for side in ("full", "lora"):
            command = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", model, "--rank", str(args.rank),
                       "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--device", args.device,
                       "--dtype", args.dtype]
            out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results[side].append(result)
            print(f"run {repeat + 1} {side:>4}: trainable {result['trainable']:,}  s/step "
                  + " ".join(f"{t:.2f}" for t in result["step_s"]) + f"  peak {result['peak_mib']:.0f} MiB", flush=True)
    peak = {side: [r["peak_mib"] for r in runs] for side, runs in results.items()}
    best = {side: min(min(r["step_s"]) for r in runs) for side, runs in results.items()}
    print(f"\nGRPO step on {os.path.basename(model.rstrip('/'))}, 4 prompts x 4 x {args.new_tokens} tokens, "
          f"{args.device} {args.dtype}, LoRA rank {args.rank}")
    for side in ("full", "lora"):
        print(f"{side:>5}: peak {min(peak[side]):.0f}-{max(peak[side]):.0f} MiB, best {best[side]:.2f} s/step")
    print(f"LoRA / full peak memory: {max(peak['lora']) / max(peak['full']):.2f}x "
          f"(step time {best['lora'] / best['full']:.2f}x)")


if __name__ == "__main__":
    main()
