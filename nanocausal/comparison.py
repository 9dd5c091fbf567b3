"""The paper's comparison at toy scale, the parts pipeline.py assembles: the tiny curriculum's
training and test data, the preference data DPO and KTO learn from, the scoring of a checkpoint on
every held-out test set, and the table.

Preference data without a stronger model. DPO and KTO need responses labelled better and worse.
At this scale there is no stronger model to write them, so they come from the SFT model itself,
scored by the official rule, the same outcome signal GRPO and PPO get (rejection sampling, as the
paper builds its preference data):

    for each of n prompts: sample k replies from the SFT model at the evaluation temperature;
    correct = those the official rule accepts, wrong = the others;
    DPO pairs  (prompt, chosen, rejected) = zip(correct, wrong): min(|correct|, |wrong|) pairs, each
               reply used once; prompts whose replies are all right or all wrong give none;
    KTO        the same replies unpaired: (prompt, chosen, true) and (prompt, rejected, false),
               so KTO sees exactly DPO's replies, half desirable, without the pairing.

So DPO, KTO, PPO and GRPO all learn from the SFT model's own replies and the same reward; they
differ in how: offline from one batch of samples (DPO, KTO) or online from fresh rollouts every
step (PPO with a learned value baseline, GRPO with the group's mean).

The test sets (tiny.make_problem's variants, disjoint from every training problem): "base", the
training distribution; "omitted" (generalisation: no Instruction line) and "redundant"
(robustness: one more true statement no formula reads), which no method trained on; optionally
"rephrased" and "insufficient" (answer LACK_CONDITION). Each is scored greedy and sampled (the
official temperature 0.6, top_p 0.95) per question kind (and query type when there are several)
and overall, beside the constant answer {"ANSWER": "No", "PROB": "0.0000"} scored by the same rule.
"""
import argparse
import json
import os
import random

from nanocausal import caugym, checkpoint, data, evaluation, tiny
from nanocausal.tokenizer import Tokenizer

CONSTANT_ANSWER = '{"ANSWER": "No", "PROB": "0.0000"}'  # right on every no-path item, wrong on every effect
SAMPLED = dict(temperature=0.6, top_p=0.95)  # the official protocol's sampling
MAX_NEW_TOKENS = 120  # a worked solution is under 100 tokens

METHODS = ("sft", "dpo", "kto", "ppo", "grpo")
# GRPO variants from the same SFT start (issue 30), named only, never part of --methods all:
# {name: (reward, curriculum)} (the plain grpo and ppo stages follow --reward and --curriculum)
GRPO_VARIANTS = {"grpo_step": ("step", "fixed"), "grpo_adaptive": ("outcome", "adaptive")}
RL_METHODS = ("ppo", "grpo", *GRPO_VARIANTS)
NAMES = {"sft": "SFT", "dpo": "SFT + DPO", "kto": "SFT + KTO", "ppo": "SFT + PPO", "grpo": "SFT + GRPO",
         "control": "SFT + more SFT (control)", "grpo_step": "SFT + GRPO, step reward",
         "grpo_adaptive": "SFT + GRPO, adaptive curriculum"}
# The fixed step budgets: steps of each method that took as long as one GRPO step on the 2-core
# machine, calibrated once at the defaults (docs/tiny_results.md); DPO's and KTO's include their
# share of sampling the preference data. A count that followed this run's timings would make the
# table depend on the machine's load.
STEPS_PER_GRPO_STEP = {"control": 12, "ppo": 0.65, "dpo": 3.9, "kto": 2.6}


def name_list(allowed, extra=()):
    """argparse type: comma-separated names from `allowed` (+ `extra`), or "all" for every one of
    `allowed`, in allowed's order."""
    def parse(text):
        names = allowed if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
        allowed_here = allowed + tuple(extra)
        bad = [n for n in names if n not in allowed_here]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad[0] if bad else text!r}: expected all or some of "
                                             f"{', '.join(allowed_here)}")
        return tuple(n for n in allowed_here if n in names)
    return parse


def stages(methods, variants, varied):
    """(methods, test variants) as the run takes them: SFT is every method's start, and --varied
    also tests on the held-out wording."""
    methods = ("sft",) + tuple(m for m in methods if m != "sft")
    return methods, ("heldout",) + variants if varied and "heldout" not in variants else variants


def budgets(grpo_steps, **given):
    """{method: fixed steps}: the one given (ppo=, dpo=, kto=, control=; None: unset), or the
    calibrated multiple of grpo_steps."""
    return {"grpo": grpo_steps, **dict.fromkeys(GRPO_VARIANTS, grpo_steps),
            **{m: given[m] or round(STEPS_PER_GRPO_STEP[m] * grpo_steps) for m in given}}


def with_chat_prompt(items):
    """Each item with its official user message as a one-turn chat (what evaluation.evaluate reads)."""
    return [dict(it, prompt=[{"role": "user", "content": caugym.official_prompt(it["problem"], it["variant"])}])
            for it in items]


def make_data(folder, seed, sft_examples, rl_prompts, rl_kinds, test_problems, variant_problems, variants,
              queries, slip_rate, train_variant="base", curve_problems=0):
    """Writes <folder>/sft.jsonl (worked solutions by the careless teacher, slip_rate) and rl.jsonl
    (answer-only prompts of rl_kinds), both of train_variant ("base", or "varied": the varied
    curriculum, tiny.make_problem); returns the held-out test sets {name: items}, train_variant's
    first, and the set of their problem texts. The sets are drawn from different seeds and any
    training problem whose text is also a test problem is dropped. curve_problems > 0 also writes
    <folder>/curve.jsonl, the first curve_problems of every test set, each tagged with its variant:
    what the trainers' periodic evaluation scores, every set beside the others."""
    tests = {train_variant: tiny.make_problems(test_problems, seed=seed + 100, variant=train_variant, queries=queries)}
    for i, variant in enumerate(variants):
        tests[variant] = tiny.make_problems(variant_problems, seed=seed + 101 + i, variant=variant, queries=queries)
    seen = {it["problem"] for items in tests.values() for it in items}
    fresh = lambda items: [it for it in items if it["problem"] not in seen]
    sft = fresh(tiny.make_problems(sft_examples, seed=seed + 1, variant=train_variant, queries=queries))
    rl = [it for it in fresh(tiny.make_problems(rl_prompts, seed=seed + 2, variant=train_variant, queries=queries))
          if it["kind"] in rl_kinds]
    slips = random.Random(seed + 3)
    os.makedirs(folder, exist_ok=True)
    data.write_jsonl(os.path.join(folder, "sft.jsonl"), [
        {"prompt": caugym.official_prompt(it["problem"]), "completion": tiny.solution(it, slip_rate, slips)} for it in sft])
    data.write_jsonl(os.path.join(folder, "rl.jsonl"), [
        {"prompt": caugym.official_prompt(it["problem"]), "answer": it["answer"], "type": it["type"]} for it in rl])
    if curve_problems:
        data.write_jsonl(os.path.join(folder, "curve.jsonl"), [
            {"prompt": caugym.official_prompt(it["problem"], it["variant"]), "answer": it["answer"], "type": it["type"],
             "variant": it["variant"]} for items in tests.values() for it in items[:curve_problems]])
    return {name: with_chat_prompt(items) for name, items in tests.items()}, seen


def preference_pairs(records, prompts):
    """DPO pairs from scored replies (evaluation records, their "index" into prompts): per prompt,
    zip(correct, wrong), so each reply is used once (module docstring)."""
    replies = {}
    for r in records:
        replies.setdefault(r["index"], ([], []))[0 if r["correct"] else 1].append(r["response"])
    return [{"prompt": caugym.official_prompt(prompts[index]["problem"]), "chosen": chosen, "rejected": rejected}
            for index, (correct, wrong) in replies.items() for chosen, rejected in zip(correct, wrong)]


def preference_data(model_dir, folder, prompts, samples, seed, batch_size=100):
    """Samples `samples` replies per prompt (items of tiny.make_problems) from the checkpoint at the
    evaluation temperature, scores them by the official rule and writes <folder>/dpo.jsonl and
    kto.jsonl (module docstring). Returns {"prompts", "replies", "correct", "pairs"}."""
    model, tokenizer = checkpoint.load_model(model_dir), Tokenizer.from_pretrained(model_dir)
    records = evaluation.evaluate(model, tokenizer, with_chat_prompt(prompts), dataset="preference",
                                  num_samples=samples, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size,
                                  seed=seed, progress=False, **SAMPLED)
    pairs = preference_pairs(records, prompts)
    if not pairs:
        raise ValueError(f"{model_dir}: none of {len(prompts)} prompts got both a right and a wrong reply in "
                           f"{samples} samples, so there is no preference pair (more --pref-samples?)")
    os.makedirs(folder, exist_ok=True)
    data.write_jsonl(os.path.join(folder, "dpo.jsonl"), pairs)
    data.write_jsonl(os.path.join(folder, "kto.jsonl"), [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"} for p in pairs for side in ("chosen", "rejected")])
    return {"prompts": len(prompts), "replies": len(records), "correct": sum(bool(r["correct"]) for r in records),
            "pairs": len(pairs)}


def groups_of(items):
    """The columns of a test set: its question kinds, its query types when there are several, overall."""
    kinds = [k for k in tiny.KINDS if any(it["kind"] == k for it in items)]
    types = sorted({it["type"] for it in items})
    return kinds + (types if len(types) > 1 else []) + ["overall"]


def accuracies(records):
    """{column: accuracy} by kind, by query type and overall (evaluation.accuracy's groups)."""
    return {**evaluation.accuracy(records, by="type"), **evaluation.accuracy(records, by="kind")}


def constant_scores(tests):
    """{test set: {column: accuracy}} of the constant answer, scored by the official rule."""
    return {name: accuracies([{"kind": it["kind"], "type": it["type"], "correct": caugym.is_correct(CONSTANT_ANSWER, it["answer"])}
                              for it in items]) for name, items in tests.items()}


def score_checkpoint(model_dir, tests, samples, seed):
    """{test set: {"greedy" / "sampled": {column: accuracy}}} of one checkpoint; greedy is one
    reply per problem, sampled `samples` at the official temperature."""
    model, tokenizer = checkpoint.load_model(model_dir), Tokenizer.from_pretrained(model_dir)
    out = {}
    for name, items in tests.items():
        out[name] = {}
        for mode, sampling, n in (("greedy", dict(temperature=0.0), 1), ("sampled", SAMPLED, samples)):
            records = evaluation.evaluate(model, tokenizer, items, dataset=name, num_samples=n,
                                          max_new_tokens=MAX_NEW_TOKENS, batch_size=100, seed=seed, progress=False,
                                          **sampling)
            out[name][mode] = accuracies(records)
    return out


def results_table(scores, constant, tests):
    """The markdown table: a row per model and decoding, a column per test set and group."""
    columns = [(name, group) for name, items in tests.items() for group in groups_of(items)]
    cell = lambda row, name, group: f"{100 * row[name][group]:.1f}" if group in row[name] else "-"
    head = "| model | decoding | " + " | ".join(f"{name}: {group}" for name, group in columns) + " |"
    lines = [head, "|---" * (len(columns) + 2) + "|",
             "| constant answer | - | " + " | ".join(cell(constant, n, g) for n, g in columns) + " |"]
    for model, by_set in scores.items():
        for mode in ("greedy", "sampled"):
            row = {name: by_set[name][mode] for name in tests}
            lines.append(f"| {model} | {mode} | " + " | ".join(cell(row, n, g) for n, g in columns) + " |")
    sizes = ", ".join(f"{name} {len(items)}" for name, items in tests.items())
    return (f"Accuracy (%) on held-out problems ({sizes}); greedy, and sampled at T=0.6, top_p=0.95, "
            f"scored by the official rule\n\n" + "\n".join(lines))


def reward_curve(history, points=10):
    """[(step, mean rollout reward)] at about `points` evenly spaced steps, the last included."""
    rows = [row for row in history if "reward" in row]
    every = max(1, len(rows) // points)
    return [(r["step"], round(float(r["reward"]), 3)) for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1]


def curve_text(name, curve):
    return f"{name} reward (mean over the step's rollouts): " + "  ".join(f"step {s}: {v:.2f}" for s, v in curve)


def write_results(out_dir, report, results):
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
