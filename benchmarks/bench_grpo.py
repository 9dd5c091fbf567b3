"""
Seconds per GRPO step and peak memory: nanocausal's train_rl.py against TRL's GRPOTrainer, in the
same run, on the same model, prompts and reward.

    python benchmarks/bench_grpo.py                  # CPU, float32; about 15 minutes on 2 cores
    python benchmarks/bench_grpo.py --repeats 1 --steps 2

The setting (issue 6): a tiny random Qwen2 with the real Qwen vocabulary (hidden 256, 4 layers, 4
query / 2 key-value heads, FFN 688, vocabulary 151,936, tied embeddings; the Qwen2.5 tokenizer and
chat template copied into the folder), 8 CauGym prompts (one per task of base.json, plus one) x 4
completions each, exactly 64 new tokens (a random model never says EOS), temperature 1 over the
full distribution, beta 0 (no reference model), one optimiser step per rollout batch, lr 1e-6,
float32, no activation checkpointing on either side (TRL's default turns it on: it would only slow
TRL down). The reward is an arbitrary function of the text that differs between completions, so
every group carries a gradient: neither trainer can skip work (a causal reward would score a
random model 0 everywhere, and train_rl.py skips groups whose rewards are all equal).

A step is everything between two optimiser steps: generation, reward, advantages, forward,
backward, optimiser. Each side runs in its own subprocess (`--side`), one warm-up step then
`--steps` timed steps; peak memory is the subprocess's ru_maxrss (resident set, imports included,
which is what a user's machine sees). The sides alternate `--repeats` times: the machine is
shared, so read the best (min) time of each side, and the ratio of those.

Measured on the team's 2-core Xeon (AVX-512, no GPU), torch 2.13, trl 1.16, transformers 5.25,
`--steps 2 --repeats 2` on 2026-12-07 with the machine quiet: nanocausal 20.0 and 16.1 s/step, peak
3.2 GiB; TRL 127.1 and 111.7 s/step, peak 7.3 GiB: 7.0x best against best (6.3x and 7.0x run by
run), at 0.43x the memory. Beside other jobs the ratio spreads widely (3.0x and 4.0x the same day;
2.8x to 16x before): read it as about 6x.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
PROMPTS_PER_STEP, GROUP_SIZE, NEW_TOKENS, LR = 8, 4, 64, 1e-6


def text_reward(text):
    """Arbitrary but deterministic, in [0, 1], different for almost every completion."""
    return (sum(map(ord, text)) % 97) / 96


def build(folder):
    """The tiny Qwen2 (transformers writes it) with the Qwen2.5 tokenizer, and the prompts file."""
    import torch
    import transformers

    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(os.path.join(folder, "model"))
    tokenizer_dir = os.path.join(SHARED, "tokenizers", "qwen2.5")
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(folder, "model"))
    with open(os.path.join(SHARED, "data", "caugym", "base.json")) as f:
        items = json.load(f)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for i in (0, 100, 200, 300, 400, 500, 600, 50):  # the seven tasks, then one more
            f.write(json.dumps({"prompt": items[i]["problem"] + "\nLet's think step by step.",
                                "answer": items[i]["answer"]}) + "\n")


def run_nanocausal(folder, steps):
    from nanocausal import data
    from nanocausal.rl import RLConfig, train_rl
    from nanocausal.tokenizer import Tokenizer

    model = os.path.join(folder, "model")
    tokenizer = Tokenizer(model)
    config = RLConfig(algo="grpo", model=model, prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP_SIZE,
                      max_new_tokens=NEW_TOKENS, micro_batch_size=PROMPTS_PER_STEP * GROUP_SIZE, lr=LR, warmup_steps=0,
                      steps=steps + 1, eval_every=0, save_every=1_000_000, device="cpu",
                      out_dir=os.path.join(folder, "nanocausal-out"), overwrite=True)  # a repeat starts again
    prompts = data.tokenize(data.load_examples(os.path.join(folder, "prompts.jsonl"), "rl"), tokenizer, "rl", progress=False)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from rl_worker import on_token_ids  # these prompts and text_reward, in place of the causal ones
    on_token_ids(setattr, lambda example, ids: text_reward(tokenizer.decode(ids, skip_special_tokens=True)), prompts)
    result = train_rl(config)
    stamps = [row["time"] for row in result.history]
    return [b - a for a, b in zip(stamps, stamps[1:])]  # the time of steps 2.., from the log's clock


def run_trl(folder, steps):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with open(os.path.join(folder, "prompts.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows] * (steps + 1))
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.started)

    def reward(completions, **kwargs):
        return [text_reward(c[0]["content"]) for c in completions]

    config = GRPOConfig(output_dir=os.path.join(folder, "trl-out"), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
                        num_generations=GROUP_SIZE, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
                        beta=0.0, num_iterations=1, gradient_accumulation_steps=1, learning_rate=LR,
                        lr_scheduler_type="constant", max_steps=steps + 1, bf16=False, gradient_checkpointing=False,
                        use_cpu=True, shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no",
                        seed=0)
    trainer = GRPOTrainer(model=os.path.join(folder, "model"), reward_funcs=reward, args=config,
                          train_dataset=dataset, callbacks=[StepTimer()])
    trainer.train()
    return times[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--side", choices=("nanocausal", "trl"), help=argparse.SUPPRESS)  # internal: one side, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        times = (run_nanocausal if args.side == "nanocausal" else run_trl)(args.folder, args.steps)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print("RESULT " + json.dumps({"step_s": times, "peak_mib": peak_mib}))
        return

    folder = tempfile.mkdtemp(prefix="bench_grpo_")
    build(folder)
    results = {"nanocausal": [], "trl": []}
    for repeat in range(args.repeats):
        for side in ("nanocausal", "trl"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--folder", folder,
                                  "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            results[side].append(result)
            print(f"run {repeat + 1} {side:>10}: s/step " + " ".join(f"{t:.2f}" for t in result["step_s"])
                  + f"  peak {result['peak_mib']:.0f} MiB", flush=True)
    best = {side: min(min(r["step_s"]) for r in runs) for side, runs in results.items()}
    peak = {side: max(r["peak_mib"] for r in runs) for side, runs in results.items()}
    print(f"\nGRPO step, {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} completions x {NEW_TOKENS} tokens, tiny Qwen2 "
          f"(151,936 vocab), CPU float32, {os.cpu_count()} cores")
    print(f"{'':>12} {'best s/step':>12} {'peak MiB':>9}")
    for side in ("nanocausal", "trl"):
        print(f"{side:>12} {best[side]:>12.2f} {peak[side]:>9.0f}")
    print(f"speed-up (TRL / nanocausal): {best['trl'] / best['nanocausal']:.2f}x; "
          f"memory ratio (nanocausal / TRL): {peak['nanocausal'] / peak['trl']:.2f}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
