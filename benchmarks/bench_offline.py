"""
Offline post-training speed and memory against the usual tools, measured in the same run on the
same weights and tokens (a benchmark, not a test: the numbers depend on the machine).

  DPO: seconds per optimiser step of train_pref.py's dpo_step (+ clip + AdamW) against TRL's
       DPOTrainer (reference model scored every step on both sides, as both do by default);
  SFT: tokens per second of train_sft.py's sft_step (+ clip + AdamW) against a plain transformers
       loop (model(input_ids, labels=...).loss.backward(), clip, AdamW).

The model is a tiny Qwen2 with the real Qwen vocabulary (hidden 256, 4 layers, 4 heads / 2 KV heads,
FFN 688, vocab 151,936, tied embeddings, float32 weights; bf16 autocast on CUDA on both sides) and the
Qwen2.5 tokenizer. The batch is 8 generated DPO pairs (nanocausal.problems) whose chat-rendered prompts are
the 8 closest to 250 tokens, completions cut to 64 tokens (EOS included); SFT trains on prompt + chosen.

Each measurement runs in its own subprocess, so its peak memory is its own: on CUDA the peak of
allocated memory during the timed steps; on CPU the process's peak resident memory (VmHWM) and
that peak minus the resident memory before the first step (the training itself, without imports
and weights). Each side runs --repeats times, alternating, and the best time is kept (the machine
may be shared: the best run is the least disturbed one).

Laptop / CPU (10-35 minutes on 2 cores, depending on how busy they are):
    python benchmarks/bench_offline.py
One GPU:
    python benchmarks/bench_offline.py --device cuda --steps 10
TRL runs with gradient_checkpointing=False (its fastest; TRL's own default is True, which is slower:
add --trl-gradient-checkpointing to measure that).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "tokenizers", "qwen2.5")
TINY_QWEN2 = dict(vocab_size=151936, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)

# -----------------------------------------------------------------------------
# Setup (main process): the model folder and the batch


def build_model(folder, tokenizer_dir):
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2), dtype=torch.float32)
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)


def build_pairs(folder, num_pairs, prompt_tokens, completion_tokens):
    from nanocausal import data
    from nanocausal.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_pretrained(folder)
    examples = data.generated_examples("dpo", 200, seed=0, variant="base")
    examples.sort(key=lambda e: abs(len(tokenizer.apply_chat_template(e["prompt"])) - prompt_tokens))
    cut = lambda text: tokenizer.decode(tokenizer.encode(text)[:completion_tokens - 1])  # + EOS = completion_tokens
    return [{"prompt": e["prompt"][0]["content"], "chosen": cut(e["chosen"]), "rejected": cut(e["rejected"])}
            for e in examples[:num_pairs]]


# -----------------------------------------------------------------------------
# Workers (one subprocess each)


def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure(step, device, warmup, steps):
    """Run step() warmup + steps times; seconds per step (mean of the timed ones) and peak memory."""
    import torch
    for _ in range(warmup):
        step()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        memory = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    else:
        memory = {"peak_mib": rss_mib("VmHWM"), "peak_above_start_mib": rss_mib("VmHWM") - before}
    return {"s_per_step": sum(times) / len(times), **memory}


def worker_ours(kind, folder, pairs, device, warmup, steps):
    from nanocausal import data, training
    from nanocausal.checkpoint import load_model
    from nanocausal.offline import PreferenceConfig, Reference, dpo_backward
    from nanocausal.offline import sft_backward
    from nanocausal.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    model = load_model(folder, device=device).train()
    optimizer = training.make_optimizer(model, lr=1e-6)
    examples = [data.normalise({**p, "completion": p["chosen"], "_where": "bench"}, kind) for p in pairs]
    rows = data.tokenize(examples, tokenizer, kind, progress=False)
    batches = data.micro_batches(rows, list(range(len(rows))), data.COLLATE[kind], tokenizer.pad_token_id,
                                 len(rows), device)
    if kind == "dpo":
        config = PreferenceConfig(device=device, beta=0.1)
        reference = Reference(load_model(folder, device=device), device)
        backward = lambda: dpo_backward(model, reference, batches, config)
    else:
        backward = lambda: sft_backward(model, batches, device)

    def step():
        backward()
        training.optimizer_step(optimizer, clip=1.0)

    result = measure(step, device, warmup, steps)
    result["tokens_per_step"] = sum(int(b["attention_mask"].sum()) for b in batches)
    return result


def worker_trl_dpo(folder, pairs, device, warmup, steps, gradient_checkpointing):
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    times, memory = [], {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                memory["before"] = rss_mib("VmRSS")
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=len(pairs), max_steps=warmup + steps,
                           learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           max_grad_norm=1.0, beta=0.1, max_length=None, gradient_checkpointing=gradient_checkpointing,
                           use_cpu=device == "cpu", bf16=device == "cuda", report_to=[], save_strategy="no",
                           logging_steps=10_000, dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()])
        trainer.train()
    if device == "cuda":
        peak = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak = {"peak_mib": rss_mib("VmHWM"), "peak_above_start_mib": rss_mib("VmHWM") - memory["before"]}
    rows = trainer.train_dataset  # TRL's tokenised pairs: prompt_ids, chosen_ids, rejected_ids
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    return {"s_per_step": sum(times) / len(times), **peak, "tokens_per_step": tokens}


def worker_hf_sft(folder, pairs, device, warmup, steps):
    import torch
    import transformers
    from nanocausal import data
    from nanocausal.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    examples = [data.normalise({"prompt": p["prompt"], "completion": p["chosen"], "_where": "bench"}, "sft") for p in pairs]
    batch = data.collate_sft(data.tokenize(examples, tokenizer, "sft", progress=False), tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # the same completion-only loss
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device == "cuda" or None)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure(step, device, warmup, steps)
    result["tokens_per_step"] = int(batch["attention_mask"].sum())
    return result


# -----------------------------------------------------------------------------
# Main: alternate the subprocesses, keep each side's best run, print the ratios


def run_worker(name, folder, pairs_file, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--folder", folder, "--pairs", pairs_file,
               "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.trl_gradient_checkpointing:
        command.append("--trl-gradient-checkpointing")
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--steps", type=int, default=3, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side (the best is kept)")
    parser.add_argument("--only", choices=["dpo", "sft"], default=None, help="measure only DPO or only SFT")
    parser.add_argument("--tokenizer", default=QWEN_TOKENIZER, help="Qwen2.5 tokenizer folder (tokenizer.json + config)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL with its default gradient checkpointing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        pairs = json.load(open(args.pairs))
        work = {"ours-dpo": lambda: worker_ours("dpo", args.folder, pairs, args.device, args.warmup, args.steps),
                "ours-sft": lambda: worker_ours("sft", args.folder, pairs, args.device, args.warmup, args.steps),
                "trl-dpo": lambda: worker_trl_dpo(args.folder, pairs, args.device, args.warmup, args.steps,
                                                  args.trl_gradient_checkpointing),
                "hf-sft": lambda: worker_hf_sft(args.folder, pairs, args.device, args.warmup, args.steps)}
        print(json.dumps(work[args.worker]()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny-qwen2")
        build_model(folder, args.tokenizer)
        pairs = build_pairs(folder, num_pairs=8, prompt_tokens=250, completion_tokens=64)
        pairs_file = os.path.join(tmp, "pairs.json")
        json.dump(pairs, open(pairs_file, "w"))
        comparisons = [("DPO", "ours-dpo", "trl-dpo", "TRL DPOTrainer"), ("SFT", "ours-sft", "hf-sft", "transformers loop")]
        comparisons = [c for c in comparisons if args.only is None or c[0].lower() == args.only]
        print(f"device {args.device}, torch threads {os.cpu_count()}, {args.steps} timed steps after {args.warmup}, "
              f"best of {args.repeats}")
        for title, ours_name, peer_name, peer_label in comparisons:
            best = {}
            for repeat in range(args.repeats):
                for name in (ours_name, peer_name) if repeat % 2 == 0 else (peer_name, ours_name):
                    result = run_worker(name, folder, pairs_file, args)
                    print(f"  {name:9s} run {repeat}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})}")
                    if name not in best or result["s_per_step"] < best[name]["s_per_step"]:
                        best[name] = result
            ours, peer = best[ours_name], best[peer_name]
            memory = " ".join(f"{k} {ours[k]:.0f} vs {peer[k]:.0f}" for k in ("peak_mib", "peak_above_start_mib") if k in ours)
            if title == "DPO":
                print(f"{title}: nanocausal {ours['s_per_step']:.3f} s/step, {peer_label} {peer['s_per_step']:.3f} s/step: "
                      f"{peer['s_per_step'] / ours['s_per_step']:.2f}x faster; memory (MiB) {memory}")
            else:
                ours_tps, peer_tps = ours["tokens_per_step"] / ours["s_per_step"], peer["tokens_per_step"] / peer["s_per_step"]
                print(f"{title}: nanocausal {ours_tps:.0f} tokens/s, {peer_label} {peer_tps:.0f} tokens/s: "
                      f"{ours_tps / peer_tps:.2f}x; memory (MiB) {memory}")


if __name__ == "__main__":
    main()
