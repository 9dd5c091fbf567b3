"""
The paper's comparison at toy scale, on a laptop CPU: what do SFT, DPO, KTO, PPO and GRPO each do to
a model's causal reasoning, in distribution and on held-out variants?

    python pipeline.py                      # SFT, GRPO and the same-compute control (laptop / CPU, no GPU,
                                            # no internet; 395 s on 2 cores, docs/tiny_results.md)
    python pipeline.py --methods all        # all five methods from one SFT start (14-21 minutes)
    python pipeline.py --methods sft,dpo,kto --variants omitted,redundant,insufficient
    python pipeline.py --teacher-slip-rate 0    # flawless worked solutions (there more SFT wins)
    python pipeline.py --sft-steps 60 --grpo-steps 10 --test-problems 50   # a smoke run of a few minutes
    python pipeline.py --varied --methods grpo,grpo_step,grpo_adaptive --curve-every 10
                                            # issue 30: the varied curriculum and its held-out wording,
                                            # GRPO with outcome / verified step reward / adaptive curriculum

It starts from data/tiny-base, a 0.45M-parameter Qwen2-architecture model with a 1000-token
byte-level BPE (digits one per token) pretrained only on generic skills (reading CauGym problem
texts, copying their numbers, column subtraction; `python build_tiny_base.py` rebuilds it in ~34
minutes), and runs the real trainers of this repository (the library functions the scripts call)
on the tiny curriculum of nanocausal/tiny.py (3-node ATE questions, with and without a causal path;
--queries ATE,ETT adds a second query type):

  SFT      offline.train_offline on --sft-examples worked solutions (column-by-column subtraction)
           written by a careless teacher: it forgets --teacher-slip-rate of the borrows it owes and
           carries the wrong digit into its final answer (a third of its solutions end wrong). SFT
           learns to solve the problems, and learns the teacher's slips with them. Every method
           below starts from this checkpoint;
  GRPO     rl.train_rl (algo grpo) on fresh answer-only problems (--rl-kinds: the "effect" ones)
           rewarded by the official scoring rule (no KL, a small warmed-up learning rate, 4 updates
           per rollout batch), rollouts at the evaluation temperature;
  PPO      the same rollouts and updates, the baseline learned by a value head (GAE) instead of
           taken from the group;
  DPO, KTO offline.train_offline on the SFT model's own sampled replies scored by the rule
           (nanocausal/comparison.py): DPO on (correct, wrong) pairs of one prompt, KTO on the same
           replies unpaired;
  control  offline.train_offline continuing SFT on the same worked solutions: the same compute
           spent on more SFT.
Each method's budget is a fixed number of steps, a multiple of --grpo-steps calibrated once so that
each took about GRPO's time (comparison.STEPS_PER_GRPO_STEP, docs/tiny_results.md): with the same
seed a rerun prints the same table (on the same machine and thread count).

evaluation.evaluate then scores every checkpoint on --test-problems held-out problems and on
--variant-problems of each held-out --variants (by default "omitted", no Instruction line:
generalisation; "redundant", one more statement no formula reads: robustness), greedy and sampled
with the official protocol's temperature 0.6 and top_p 0.95, by the official rule, per question
kind and overall, beside the constant answer "no path, 0.0000". It prints the table and the RL
reward curves and writes <out>/results.md, results.json (every number) and results.png (with
matplotlib). What it showed is in docs/tiny_results.md and the README. On a machine with a GPU the
trainers use it automatically (not measured: no GPU was available); the real-model recipe is in
the README.
"""
import contextlib
import importlib.util
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from nanocausal import cli, comparison, plot, tiny
from nanocausal.offline import PreferenceConfig, SFTConfig, train_offline
from nanocausal.rl import RLConfig, train_rl

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = cli.parser_for(__doc__)
    p.add_argument("--methods", type=comparison.name_list(comparison.METHODS, comparison.GRPO_VARIANTS),
                   default="sft,grpo",
                   help="post-training methods to compare from the shared SFT start, comma-separated from "
                        "sft, dpo, kto, ppo, grpo, or all (SFT always runs: it is every method's start; the "
                        "same-compute SFT control always runs too); also grpo_step (GRPO with the step reward) "
                        "and grpo_adaptive (GRPO on the adaptive curriculum), not part of all")
    p.add_argument("--base", default=os.path.join(ROOT, "data", "tiny-base"), help="the pretrained tiny base folder")
    p.add_argument("--out", default="runs/pipeline", help="output folder (data, checkpoints, results)")
    p.add_argument("--queries", type=comparison.name_list(tiny.QUERIES), default="ATE",
                   help="query types of the curriculum, comma-separated: ATE, ETT (docs/tiny_results.md: what ATE,ETT gave)")
    p.add_argument("--sft-examples", type=cli.positive_int, default=800, help="worked solutions for SFT (a few hundred, reused each epoch)")
    p.add_argument("--teacher-slip-rate", type=cli.probability, default=0.3,
                   help="share of the borrows the worked solutions forget, carrying the error to the answer "
                        "(a careless teacher; 0: flawless solutions)")
    p.add_argument("--sft-steps", type=cli.positive_int, default=200, help="SFT optimiser steps (batch --batch-size)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="SFT examples per step")
    p.add_argument("--sft-lr", type=cli.non_negative_float, default=2e-3, help="SFT peak learning rate")
    p.add_argument("--grpo-steps", type=cli.positive_int, default=40,
                   help="GRPO steps (one rollout batch each); every other method's budget is a fixed multiple of it")
    p.add_argument("--prompts-per-step", type=cli.positive_int, default=16, help="GRPO and PPO prompts per step")
    p.add_argument("--group-size", type=cli.positive_int, default=8, help="GRPO and PPO completions per prompt")
    p.add_argument("--grpo-mini-batches", type=cli.positive_int, default=4,
                   help="optimiser steps per rollout batch, GRPO and PPO (4: four updates of 4 groups each per step)")
    p.add_argument("--grpo-lr", type=cli.non_negative_float, default=3e-5,
                   help="GRPO and PPO learning rate (constant after warmup, no KL; 1e-4 did not help, 2e-4 collapsed, docs/tiny_results.md)")
    p.add_argument("--grpo-warmup", type=cli.non_negative_int, default=3,
                   help="GRPO and PPO warmup steps (Adam's first updates move every weight by ~lr: unwarmed, they can wreck the SFT model)")
    p.add_argument("--rl-kinds", type=comparison.name_list(tiny.KINDS), default="effect",
                   help="comma-separated question kinds the RL and preference methods see (effect, no path); the "
                        "no-path replies are all correct from the start, so they teach nothing and only cost time")
    p.add_argument("--rollout-temperature", type=cli.positive_float, default=0.6,
                   help="GRPO and PPO sampling temperature (0.6: the evaluation's, so RL optimises what is measured)")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="GRPO stage: DAPO's dynamic sampling (drop all-equal-reward groups, roll out more prompts until "
                        "the step has --prompts-per-step informative groups; README, docs/tiny_results.md)")
    p.add_argument("--max-sampling-rounds", type=cli.positive_int, default=RLConfig.max_sampling_rounds,
                   help="with --dynamic-sampling: at most this many rounds of prompts per GRPO step")
    p.add_argument("--reward", choices=("outcome", "step"), default="outcome",
                   help="GRPO and PPO reward: the answer's, or per-token credit from the exact check of every step of "
                        "the worked solution (nanocausal/step_rewards.py)")
    p.add_argument("--curriculum", choices=("fixed", "adaptive"), default="fixed",
                   help="GRPO and PPO prompts: rl.jsonl, or effect problems generated with a number of borrows that "
                        "follows the pass rate towards 0.5 (nanocausal/curriculum.py)")
    p.add_argument("--varied", action="store_true",
                   help="train every method on the varied curriculum (several wordings, Instruction line sometimes "
                        "left out) and add the held-out wording (heldout) to the test sets (nanocausal/tiny.py)")
    p.add_argument("--curve-every", type=cli.non_negative_int, default=0,
                   help="SFT and RL score 50 problems of every test set every this many steps (at most 4 times a run), "
                        "side by side in their metrics.jsonl (eval_acc_<set>; 0: never)")
    p.add_argument("--reuse-sft", action="store_true",
                   help="skip SFT when <out>/sft/checkpoint exists (e.g. a link to another run's, same seed and flags): "
                        "compare a GRPO option without training SFT again")
    p.add_argument("--no-control", action="store_true", help="skip the same-compute SFT control")
    p.add_argument("--ppo-steps", type=cli.positive_int, default=None,
                   help=f"PPO steps (unset: {comparison.STEPS_PER_GRPO_STEP['ppo']} per GRPO step, the calibrated same compute)")
    p.add_argument("--dpo-steps", type=cli.positive_int, default=None,
                   help=f"DPO steps of --pref-batch-size pairs (unset: {comparison.STEPS_PER_GRPO_STEP['dpo']} per GRPO step)")
    p.add_argument("--kto-steps", type=cli.positive_int, default=None,
                   help=f"KTO steps of 2 x --pref-batch-size replies (unset: {comparison.STEPS_PER_GRPO_STEP['kto']} per GRPO step)")
    p.add_argument("--control-steps", type=cli.positive_int, default=None,
                   help=f"SFT steps of the same-compute control (unset: {comparison.STEPS_PER_GRPO_STEP['control']} per GRPO step)")
    p.add_argument("--pref-prompts", type=cli.positive_int, default=1024,
                   help="prompts the SFT model answers to make DPO's pairs and KTO's labels")
    p.add_argument("--pref-samples", type=cli.positive_int, default=4, help="replies sampled per preference prompt")
    p.add_argument("--pref-batch-size", type=cli.positive_int, default=16,
                   help="DPO pairs per step (KTO: twice as many single replies, the same sequences)")
    p.add_argument("--dpo-lr", type=cli.non_negative_float, default=5e-6,
                   help="DPO peak learning rate (cosine; 1e-5 collapsed two seeds of three, docs/tiny_results.md)")
    p.add_argument("--kto-lr", type=cli.non_negative_float, default=1e-5, help="KTO peak learning rate (cosine)")
    p.add_argument("--pref-beta", type=cli.non_negative_float, default=0.1, help="DPO and KTO beta (the implicit KL strength)")
    p.add_argument("--test-problems", type=cli.positive_int, default=200, help="held-out problems of the base test set")
    p.add_argument("--variants", type=comparison.name_list(tiny.VARIANTS[1:5], ("heldout",)), default="omitted,redundant",
                   help="held-out test variants beside the base set, comma-separated from rephrased, omitted, "
                        "redundant, insufficient (nanocausal/tiny.py; no method trains on any)")
    p.add_argument("--variant-problems", type=cli.positive_int, default=100, help="held-out problems per variant")
    p.add_argument("--eval-samples", type=cli.positive_int, default=2, help="samples per problem for sampled accuracy")
    p.add_argument("--jobs", type=cli.positive_int, default=2,
                   help="methods trained (and checkpoints scored) at once, each in its own process: they all start "
                        "from the SFT checkpoint, so they are independent (2 for 2 cores; 1: one by one, in this process)")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads per job")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the data, training and sampling")
    args = p.parse_args(argv)
    args.methods, args.variants = comparison.stages(args.methods, args.variants, args.varied)
    return args


def curve_settings(args, data_dir, steps):
    """The periodic evaluation of a trainer under --curve-every (none without it): at the start, then
    every --curve-every steps but at most 4 times more (a point costs a few hundred greedy replies)."""
    if not args.curve_every:
        return dict(eval_every=0)
    return dict(eval_every=min(max(args.curve_every, steps // 4), steps), eval_data=os.path.join(data_dir, "curve.jsonl"),
                eval_problems=10**6, eval_temperature=0.0, eval_max_new_tokens=comparison.MAX_NEW_TOKENS,
                eval_batch_size=100)


def train_method(method, args, steps, data_dir, run_dir):
    """Train one method from the SFT checkpoint; returns the TrainResult."""
    sft_checkpoint = os.path.join(args.out, "sft", "checkpoint")
    curve = curve_settings(args, data_dir, steps)
    if method in comparison.RL_METHODS:
        # GRPO: the group's mean is the baseline; PPO: a value head learns it (GAE with gamma = lam = 1,
        # veRL's defaults: the one reward at the end reaches every token undiscounted, the borrow
        # columns far from it included). The same prompts, samples and updates per step; no KL for
        # either (no reference model).
        reward, curriculum = comparison.GRPO_VARIANTS.get(method, (args.reward, args.curriculum))
        return train_rl(RLConfig(
            algo="ppo" if method == "ppo" else "grpo", model=sft_checkpoint, steps=steps, reward=reward,
            curriculum=curriculum,
            variant="varied" if args.varied else "base",
            data=os.path.join(data_dir, "rl.jsonl") if curriculum == "fixed" else None,
            prompts_per_step=args.prompts_per_step, group_size=args.group_size, max_new_tokens=comparison.MAX_NEW_TOKENS,
            temperature=args.rollout_temperature, micro_batch_size=64, mini_batches=args.grpo_mini_batches,
            lr=args.grpo_lr, warmup_steps=args.grpo_warmup, kl_coef=0.0, lam=1.0, **curve, overwrite=True,
            seed=args.seed, save_every=steps, out_dir=run_dir,
            dynamic_sampling=args.dynamic_sampling and method == "grpo", max_sampling_rounds=args.max_sampling_rounds))
    if method in ("dpo", "kto"):  # KTO's batch: the same replies as DPO's, unpaired
        return train_offline(PreferenceConfig(
            algo=method, model=sft_checkpoint, data=os.path.join(data_dir, f"{method}.jsonl"), steps=steps,
            batch_size=args.pref_batch_size * (2 if method == "kto" else 1), lr=args.dpo_lr if method == "dpo" else args.kto_lr, beta=args.pref_beta,
            warmup_steps=3, precompute_ref=True, max_length=512, save_every=steps, out_dir=run_dir,
            log_every=10, eval_every=0, overwrite=True, seed=args.seed))
    # the control: the same compute spent on more SFT, on the same worked solutions
    return train_offline(SFTConfig(
        model=sft_checkpoint, data=os.path.join(data_dir, "sft.jsonl"), steps=steps, batch_size=args.batch_size,
        lr=args.sft_lr / 2, warmup_steps=0, save_every=steps, out_dir=run_dir, log_every=20, **curve,
        overwrite=True, seed=args.seed, max_length=512))


def preference_prompts(args, seen):
    """Fresh prompts of the RL kinds, none of them a test problem, for DPO's and KTO's data."""
    items = tiny.make_problems(2 * args.pref_prompts, seed=args.seed + 4, variant="varied" if args.varied else "base",
                               queries=args.queries)
    return [it for it in items if it["kind"] in args.rl_kinds and it["problem"] not in seen][:args.pref_prompts]


@contextlib.contextmanager
def log_traceback(log):
    """A failing job's traceback goes to its log (the main process prints one line)."""
    try:
        yield
    except Exception:
        if log:
            traceback.print_exc(file=log)
        raise


def job(kind, method, args, *rest):
    """One stage in a worker process (--jobs > 1), its output in <out>/<method>/log.txt: ("train",
    method) -> (wall seconds, RL history); ("preference",) -> (seconds, summary); ("score", method,
    tests) -> (seconds, scores)."""
    torch.set_num_threads(args.threads)
    folder = os.path.join(args.out, method)
    os.makedirs(folder, exist_ok=True)
    clock = time.time()
    log = open(os.path.join(folder, "log.txt" if kind != "score" else "eval_log.txt"), "w") if args.jobs > 1 else None
    with contextlib.redirect_stdout(log or sys.stdout), contextlib.redirect_stderr(log or sys.stderr), \
            log_traceback(log):
        if kind == "train":
            steps, data_dir = rest
            result = train_method(method, args, steps, data_dir, folder)
            out = result.history if method in comparison.RL_METHODS else None
        elif kind == "preference":
            data_dir, seen = rest
            out = comparison.preference_data(os.path.join(args.out, "sft", "checkpoint"), data_dir,
                                             preference_prompts(args, seen), args.pref_samples, seed=args.seed + 4)
        else:
            out = comparison.score_checkpoint(os.path.join(folder, "checkpoint"), rest[0], args.eval_samples, args.seed)
    if log:
        log.close()
    return time.time() - clock, out


def run_jobs(args, jobs, then=None):
    """Run {name: (kind, method, *rest)} on --jobs worker processes (in order; in this process with
    --jobs 1) and return {name: result}. then(name, result) may return more jobs to start (DPO and
    KTO after their preference data)."""
    results, pending = {}, dict(jobs)
    if args.jobs == 1:
        while pending:
            name, spec = next(iter(pending.items()))
            del pending[name]
            results[name] = job(spec[0], spec[1], args, *spec[2:])
            pending.update(then(name, results[name]) if then else {})
        return results
    # spawn: each worker imports torch afresh (forking a process that already ran torch is fragile)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(job, spec[0], spec[1], args, *spec[2:]): name for name, spec in pending.items()}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except (ValueError, OSError, RuntimeError) as e:  # one line (cli.run_main), the traceback in the log
                    raise ValueError(f"{name}: {e} (its log is in {args.out}/)") from e
                print(f"  {name} done ({results[name][0]:.0f}s)")
                for more, spec in (then(name, results[name]) if then else {}).items():
                    running[pool.submit(job, spec[0], spec[1], args, *spec[2:])] = more
    return results


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if not os.path.isfile(os.path.join(args.base, "model.safetensors")):
        sys.exit(f"{args.base}: no model.safetensors (rebuild it with: python build_tiny_base.py --out {args.base})")
    steps = comparison.budgets(args.grpo_steps, ppo=args.ppo_steps, dpo=args.dpo_steps, kto=args.kto_steps,
                               control=args.control_steps)
    data_dir = os.path.join(args.out, "data")
    tests, seen = comparison.make_data(
        data_dir, args.seed, args.sft_examples, rl_prompts=4 * args.grpo_steps * args.prompts_per_step + 100,
        rl_kinds=args.rl_kinds, test_problems=args.test_problems, variant_problems=args.variant_problems,
        variants=args.variants, queries=args.queries, slip_rate=args.teacher_slip_rate,
        train_variant="varied" if args.varied else "base", curve_problems=50 if args.curve_every else 0)
    seconds = {}

    if args.reuse_sft and os.path.isdir(os.path.join(args.out, "sft", "checkpoint")):
        print(f"[1/3] SFT: reusing {os.path.join(args.out, 'sft', 'checkpoint')}")
    else:
        print(f"[1/3] SFT: {args.sft_steps} steps x {args.batch_size} worked solutions (every method's start)")
        result = train_offline(SFTConfig(
            model=args.base, data=os.path.join(data_dir, "sft.jsonl"), steps=args.sft_steps, batch_size=args.batch_size,
            lr=args.sft_lr, warmup_steps=10, save_every=args.sft_steps, out_dir=os.path.join(args.out, "sft"),
            log_every=20, **curve_settings(args, data_dir, args.sft_steps), overwrite=True, seed=args.seed,
            max_length=512))
        seconds["sft"] = result.wall_seconds

    methods = [m for m in args.methods if m != "sft"] + ([] if args.no_control else ["control"])
    print(f"[2/3] from the SFT checkpoint, {args.jobs} at a time (logs: {args.out}/<method>/log.txt): "
          + ", ".join(f"{comparison.NAMES[m]} {steps[m]} steps" for m in methods))
    jobs = {m: ("train", m, steps[m], data_dir) for m in methods if m not in ("dpo", "kto")}
    if "dpo" in methods or "kto" in methods:
        # One batch of the SFT model's own replies, scored by the rule, for both (each budget counts
        # the time it took: docs/tiny_results.md); DPO and KTO start when it is ready.
        jobs = {"preference data": ("preference", "preference", data_dir, seen), **jobs}
    after_preference = lambda name, _: {m: ("train", m, steps[m], data_dir) for m in ("dpo", "kto")
                                        if m in methods} if name == "preference data" else {}
    trained = run_jobs(args, jobs, then=after_preference)
    preference = trained.pop("preference data", (None, None))[1]
    histories = {m: history for m, (_, history) in trained.items() if history}
    seconds.update({m: s for m, (s, _) in trained.items()})

    print(f"[3/3] evaluation of {len(methods) + 1} checkpoints on {', '.join(tests)}")
    clock = time.time()
    scored = run_jobs(args, {m: ("score", m, tests) for m in ["sft"] + methods})
    scores = {comparison.NAMES[m]: scored[m][1] for m in ["sft"] + methods}
    seconds["eval"] = time.time() - clock
    seconds["total"] = time.time() - started
    constant = comparison.constant_scores(tests)
    curves = {comparison.NAMES[m]: comparison.reward_curve(histories[m]) for m in comparison.RL_METHODS if m in histories}
    timing = ("wall time: " + ", ".join(f"{m} {s:.0f}s" + (f" ({steps[m]} steps)" if m in steps else "")
                                        for m, s in seconds.items())
              + f" ({args.jobs} jobs of {args.threads} torch thread{'s' if args.threads > 1 else ''})")
    report = "\n".join([comparison.results_table(scores, constant, tests), ""]
                       + [comparison.curve_text(name, c) for name, c in curves.items()] + [timing, ""])
    print(report)
    results = {"args": vars(args), "steps": {"sft": args.sft_steps, **{m: steps[m] for m in methods}},
               "run_dirs": {comparison.NAMES[m]: m for m in ["sft"] + methods},
               "scores": scores, "constant_answer": constant, "reward_curves": curves,
               "preference_data": preference, "seconds": seconds}
    comparison.write_results(args.out, report, results)
    if importlib.util.find_spec("matplotlib"):
        print(f"wrote {plot.plot_results(args.out)}")
    else:
        print(f"(no matplotlib: pip install matplotlib, then python -m nanocausal.plot --results {args.out} "
              f"draws results.png there)")
    return results


if __name__ == "__main__":
    cli.run_main(main)
