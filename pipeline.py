"""
The whole paper at toy scale, on a laptop CPU, in under 10 minutes: what do SFT and RL each do to
a model's causal reasoning?

    python pipeline.py                      # laptop / CPU, no GPU, no internet (measured: 6.4-7.3 min
                                            # on a 2-core machine with another job beside it)
    python pipeline.py --teacher-slip-rate 0    # flawless worked solutions (there more SFT wins)
    python pipeline.py --sft-steps 60 --grpo-steps 10 --test-problems 50   # a smoke run of a few minutes

It starts from data/tiny-base, a 0.45M-parameter Qwen2-architecture model with a 1000-token
byte-level BPE (digits one per token) pretrained only on generic skills (reading CauGym problem
texts, copying their numbers, column subtraction; `python build_tiny_base.py` rebuilds it in ~34
minutes), and runs the real trainers of this repository (the library functions the scripts call) on the tiny curriculum of
nanocausal/tiny.py (3-node ATE questions, with and without a causal path):

  1. SFT      sft.train_sft on --sft-examples worked solutions (column-by-column subtraction)
              written by a careless teacher: it forgets --teacher-slip-rate of the borrows it owes
              and carries the wrong digit into its final answer (a third of its solutions end
              wrong). SFT learns to solve the problems, and learns the teacher's slips with them;
  2. GRPO     rl.train_rl (algo grpo) from the SFT checkpoint, on fresh answer-only problems
              (--rl-kinds: by default the "effect" ones only) rewarded by the official scoring
              rule (no KL, a small warmed-up learning rate, 4 updates per rollout batch), rollouts
              at the evaluation temperature: the outcome reward keeps the method, drops the slips;
  3. control  sft.train_sft continuing the SFT checkpoint on the same --sft-examples worked
              solutions for --control-steps steps (default 9 per GRPO step: what GRPO's training
              time bought in nine measured runs, docs/tiny_results.md): the same compute spent on
              more SFT, fixed in steps so that a rerun prints the same table;
  4. eval     evaluation.evaluate on --test-problems held-out problems (and --rephrased-problems in
              held-out wording, never seen in post-training), greedy and sampled with the
              official protocol's temperature 0.6 and top_p 0.95, scored by the official rule.

It prints the table (accuracy per question kind beside the constant-answer baseline, which always
says "no path, 0.0000") and the GRPO reward curve, and writes them with every number to
<out>/results.json and <out>/results.md. What it showed is in docs/tiny_results.md; in short, SFT
on imperfect demonstrations imitates their mistakes, which sampling at temperature 0.6 brings out
(greedy 86.5 %, sampled 71.5 %); GRPO on the outcome gains 14.7 points sampled, the same compute
spent on more SFT 1.7 to 7.0. With flawless demonstrations (--teacher-slip-rate 0) more SFT beats GRPO.
On a machine with a GPU the trainers use it automatically (not measured: no GPU was available); the
real-model recipe is in the README.
"""
import importlib.util
import json
import os
import random
import sys
import time

import torch

from nanocausal import caugym, checkpoint, cli, data, evaluation, plot, tiny
from nanocausal.rl import RLConfig, train_rl
from nanocausal.sft import SFTConfig, train_sft
from nanocausal.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = cli.parser_for(__doc__)
    p.add_argument("--base", default=os.path.join(ROOT, "data", "tiny-base"), help="the pretrained tiny base folder")
    p.add_argument("--out", default="runs/pipeline", help="output folder (data, checkpoints, results)")
    p.add_argument("--sft-examples", type=cli.positive_int, default=800, help="worked solutions for SFT (a few hundred, reused each epoch)")
    p.add_argument("--teacher-slip-rate", type=cli.non_negative_float, default=0.3,
                   help="share of the borrows the worked solutions forget, carrying the error to the answer "
                        "(a careless teacher; 0: flawless solutions)")
    p.add_argument("--sft-steps", type=cli.positive_int, default=200, help="SFT optimiser steps (batch --batch-size)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="SFT examples per step")
    p.add_argument("--sft-lr", type=cli.non_negative_float, default=2e-3, help="SFT peak learning rate")
    p.add_argument("--grpo-steps", type=cli.positive_int, default=40, help="GRPO steps (one rollout batch each)")
    p.add_argument("--prompts-per-step", type=cli.positive_int, default=16, help="GRPO prompts per step")
    p.add_argument("--group-size", type=cli.positive_int, default=8, help="GRPO completions per prompt")
    p.add_argument("--grpo-mini-batches", type=cli.positive_int, default=4,
                   help="optimiser steps per rollout batch (4: four updates of 4 groups each per step)")
    p.add_argument("--grpo-lr", type=cli.non_negative_float, default=3e-5,
                   help="GRPO learning rate (constant after warmup, no KL; 1e-4 did not help, 2e-4 collapsed, docs/tiny_results.md)")
    p.add_argument("--grpo-warmup", type=cli.non_negative_int, default=3,
                   help="GRPO warmup steps (Adam's first updates move every weight by ~lr: unwarmed, they can wreck the SFT model)")
    p.add_argument("--rl-kinds", default="effect",
                   help="comma-separated question kinds GRPO rolls out on (effect, no path); the no-path groups are "
                        "all correct from the start, so their advantages are 0 and they only cost rollout time")
    p.add_argument("--control-steps", type=cli.positive_int, default=None,
                   help="SFT steps of the same-compute control (default: 9 per GRPO step, calibrated once against "
                        "GRPO's measured training time, docs/tiny_results.md)")
    p.add_argument("--rollout-temperature", type=cli.non_negative_float, default=0.6,
                   help="GRPO sampling temperature (0.6: the evaluation's, so RL optimises what is measured)")
    p.add_argument("--test-problems", type=cli.positive_int, default=200, help="held-out problems of the base test set")
    p.add_argument("--rephrased-problems", type=cli.non_negative_int, default=0,
                   help="held-out problems in held-out wording (0: none; every model scored 0 %% on 100 of them, docs/tiny_results.md)")
    p.add_argument("--eval-samples", type=cli.positive_int, default=2, help="samples per problem for sampled accuracy")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, training and sampling")
    return p.parse_args(argv)


CONTROL_STEPS_PER_GRPO_STEP = 9  # the same-compute control's SFT steps per GRPO step (calibration: docs/tiny_results.md)


def make_data(args, folder):
    """Disjoint SFT, RL and test problems (different seeds; any repeated problem text is dropped)."""
    n = args.test_problems
    tests = {"base": tiny.make_problems(n, seed=args.seed + 100)}
    if args.rephrased_problems:
        tests["rephrased"] = tiny.make_problems(args.rephrased_problems, seed=args.seed + 101, rephrased=True)
    seen = {it["problem"] for items in tests.values() for it in items}
    fresh = lambda items: [it for it in items if it["problem"] not in seen]
    sft = fresh(tiny.make_problems(args.sft_examples, seed=args.seed + 1))
    # GRPO's answer-only problems are unlimited (fresh ones every step); the control continues SFT on
    # the same --sft-examples worked solutions, which are the scarce resource.
    kinds = set(args.rl_kinds.split(","))
    rl = [it for it in fresh(tiny.make_problems(4 * args.grpo_steps * args.prompts_per_step + 100, seed=args.seed + 2))
          if it["kind"] in kinds]
    os.makedirs(folder, exist_ok=True)
    slips = random.Random(args.seed + 3)
    as_sft = lambda items: [{"prompt": caugym.official_prompt(it["problem"]),
                             "completion": tiny.solution(it, args.teacher_slip_rate, slips)} for it in items]
    data.write_jsonl(os.path.join(folder, "sft.jsonl"), as_sft(sft))
    data.write_jsonl(os.path.join(folder, "rl.jsonl"), [{"prompt": caugym.official_prompt(it["problem"]), "answer": it["answer"],
                                                    "type": it["type"]} for it in rl])
    for name, items in tests.items():
        for it in items:
            it["prompt"] = [{"role": "user", "content": caugym.official_prompt(it["problem"])}]
    return tests


def score_checkpoint(path, tests, args):
    """{test set: {"greedy" / "sampled": {kind: accuracy}}} of one checkpoint."""
    model, tokenizer = checkpoint.load_model(path), Tokenizer.from_pretrained(path)
    out = {}
    for name, items in tests.items():
        out[name] = {}
        for mode, temperature, samples in (("greedy", 0.0, 1), ("sampled", 0.6, args.eval_samples)):
            records = evaluation.evaluate(model, tokenizer, items, dataset=name, num_samples=samples,
                                          temperature=temperature, top_p=0.95, max_new_tokens=120,
                                          batch_size=100, seed=args.seed, progress=False)
            out[name][mode] = evaluation.accuracy(records, by="kind")
            out[name][mode]["samples"] = len(records)
    return out


def results_table(scores, tests):
    kinds = list(tiny.KINDS) + ["overall"]
    lines = []
    for name, items in tests.items():
        share = sum(it["kind"] == "no path" for it in items) / len(items)
        constant = {"effect": 0.0, "no path": 1.0, "overall": share}
        lines += [f"\n{name} test set ({len(items)} held-out problems; sampled: T=0.6, top_p=0.95)\n",
                  "| model | decoding | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|",
                  "| constant answer | - | " + " | ".join(f"{100 * constant[k]:.1f}" for k in kinds) + " |"]
        for model, by_set in scores.items():
            for mode in ("greedy", "sampled"):
                row = by_set[name][mode]
                lines.append(f"| {model} | {mode} | " + " | ".join(f"{100 * row.get(k, 0.0):.1f}" for k in kinds) + " |")
    return "\n".join(lines)


def reward_curve(history, points=10):
    rows = [row for row in history if "reward" in row]
    if not rows:
        return [], ""
    every = max(1, len(rows) // points)
    picked = [r for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1]
    curve = [(r["step"], round(float(r["reward"]), 3)) for r in picked]
    return curve, "GRPO reward (mean over the step's rollouts): " + "  ".join(f"step {s}: {v:.2f}" for s, v in curve)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if not os.path.isfile(os.path.join(args.base, "model.safetensors")):
        sys.exit(f"{args.base}: no model.safetensors (rebuild it with: python build_tiny_base.py --out {args.base})")
    data_dir = os.path.join(args.out, "data")
    tests = make_data(args, data_dir)
    sft_dir, grpo_dir, control_dir = (os.path.join(args.out, n) for n in ("sft", "grpo", "control"))
    sft_data = os.path.join(data_dir, "sft.jsonl")

    print(f"[1/4] SFT: {args.sft_steps} steps x {args.batch_size} worked solutions")
    sft = train_sft(SFTConfig(
        model=args.base, data=sft_data, steps=args.sft_steps, batch_size=args.batch_size, lr=args.sft_lr,
        warmup_steps=10, save_every=args.sft_steps, out_dir=sft_dir, log_every=20, eval_every=0, overwrite=True,
        seed=args.seed, max_length=512))
    sft_checkpoint = os.path.join(sft_dir, "checkpoint")

    print(f"[2/4] GRPO: {args.grpo_steps} steps x {args.prompts_per_step} prompts x {args.group_size} samples")
    grpo = train_rl(RLConfig(
        algo="grpo", model=sft_checkpoint, data=os.path.join(data_dir, "rl.jsonl"), steps=args.grpo_steps,
        prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=120,
        temperature=args.rollout_temperature, micro_batch_size=64, mini_batches=args.grpo_mini_batches,
        lr=args.grpo_lr, warmup_steps=args.grpo_warmup, eval_every=0, overwrite=True, seed=args.seed,
        save_every=args.grpo_steps, out_dir=grpo_dir))

    # Same compute, fixed in steps: one GRPO step took as long as 9 SFT steps (the median of nine
    # measured runs, docs/tiny_results.md). A count that followed this run's timings would make the
    # table depend on the machine's load.
    control_steps = args.control_steps or CONTROL_STEPS_PER_GRPO_STEP * args.grpo_steps
    print(f"[3/4] control: {control_steps} more SFT steps (GRPO took {grpo.train_seconds:.0f}s this run, "
          f"SFT {sft.train_seconds / args.sft_steps:.2f}s/step)")
    control = train_sft(SFTConfig(
        model=sft_checkpoint, data=sft_data, steps=control_steps, batch_size=args.batch_size, lr=args.sft_lr / 2,
        warmup_steps=0, save_every=control_steps, out_dir=control_dir, log_every=20, eval_every=0, overwrite=True,
        seed=args.seed, max_length=512))

    print("[4/4] evaluation")
    eval_started = time.time()
    scores = {"SFT": score_checkpoint(sft_checkpoint, tests, args),
              "SFT + GRPO": score_checkpoint(os.path.join(grpo_dir, "checkpoint"), tests, args),
              "SFT + more SFT (control)": score_checkpoint(os.path.join(control_dir, "checkpoint"), tests, args)}
    eval_seconds = time.time() - eval_started
    curve, curve_text = reward_curve(grpo.history)
    table = results_table(scores, tests)
    timing = (f"wall time: SFT {sft.wall_seconds:.0f}s ({args.sft_steps} steps), GRPO {grpo.wall_seconds:.0f}s "
              f"({args.grpo_steps} steps), control {control.wall_seconds:.0f}s "
              f"({control_steps} steps), eval {eval_seconds:.0f}s, total {time.time() - started:.0f}s "
              f"(torch threads {args.threads})")
    report = f"{table}\n\n{curve_text}\n{timing}\n"
    print(report)
    if importlib.util.find_spec("matplotlib"):
        plot.plot_runs([sft_dir, grpo_dir, control_dir], os.path.join(args.out, "curves.png"),
                       names=["SFT", "SFT + GRPO", "control"])
    else:
        print("(pip install matplotlib for the curves: python -m nanocausal.plot on the three run folders)")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "scores": scores, "reward_curve": curve, "control_steps": control_steps,
                   "seconds": {"sft": sft.wall_seconds, "grpo": grpo.wall_seconds, "control": control.wall_seconds,
                               "eval": eval_seconds, "total": time.time() - started}}, f, indent=2)
    return scores


if __name__ == "__main__":
    cli.run_main(main)
