"""
Online reinforcement learning for causal reasoning: GRPO (the paper's strongest method) and PPO.
The model answers causal problems, the official CauGym rule scores the answers, and the policy
moves towards the answers that scored better than their alternatives.

One GPU (bf16 autocast over float32 weights; problems generated on the fly by nanocausal.problems):

    python train_rl.py --algo grpo --model Qwen/Qwen2.5-1.5B-Instruct --prompts-per-step 32 \\
        --group-size 8 --max-new-tokens 1024 --micro-batch-size 16 --lr 1e-6 --steps 500 \\
        --activation-checkpointing --out-dir out/grpo
    python train_rl.py --algo ppo --model Qwen/Qwen2.5-1.5B-Instruct --prompts-per-step 64 \\
        --max-new-tokens 1024 --micro-batch-size 16 --lr 1e-6 --kl-coef 0.05 --steps 500 \\
        --activation-checkpointing --out-dir out/ppo

Laptop (CPU, a 135M model, short answers; a minute or two per step on 2 cores):

    python train_rl.py --algo grpo --model out/sft-laptop/checkpoint --prompts-per-step 2 \\
        --group-size 4 --max-new-tokens 128 --steps 20 --tasks ATE --variant base --eval-every 10 \\
        --eval-problems 8 --eval-max-new-tokens 128 --out-dir out/grpo-laptop

out/sft-laptop/checkpoint is what train_sft.py's laptop command writes. --model
HuggingFaceTB/SmolLM2-135M-Instruct runs too, but it almost never answers right: every group's
rewards are then all 0 and there is nothing to learn from (equal_reward_groups = 1 in the log).

Usually one starts from an SFT checkpoint (--model out/sft/checkpoint). The official training
prompts instead of generated ones: --data ../shared/data/caugym/train_online_rl.jsonl (prompt,
answer). Ctrl-C writes a checkpoint; rerun the same command with --resume to continue exactly.

Where things are: the step (prompts, rollouts, rewards, advantages, update) is nanocausal/rl.py,
where the GRPO and PPO classes hold everything that differs between the two; the rollouts and
rewards nanocausal/rollout.py; the losses (each with its formula) nanocausal/grpo_losses.py (GRPO and
its options) and nanocausal/losses.py (PPO); the loop
(schedule, logging, evaluation, checkpoints, Ctrl-C, resume) nanocausal/training.py. This file
only turns flags into an RLConfig.

Every step logs, to the progress bar and out-dir/metrics.jsonl: reward, accuracy, format rate,
the share of groups with all-equal rewards, completion lengths, KL to the reference (when one is
loaded), clip fraction, entropy (the exact mean over every completion token), generation vs
training time and tokens/s, the share of loss tokens from truncated completions (truncated_loss_tokens).
Every --eval-every
steps: official accuracy on held-out generated problems, and a few completions printed.

Several GPUs: the same flags under torchrun (FSDP2; README "More GPUs"); each rank samples
its share of the prompts, the batch is global:
    torchrun --standalone --nproc-per-node 8 train_rl.py --algo grpo --model out/sft/checkpoint ...

Not implemented: a separate inference engine (vLLM) or asynchronous rollouts, packing
several sequences into one row, learned reward models (rewards are rules), refreshing the
reference model, and a PPO value model separate from the policy (the value head shares the
policy's trunk and starts at zero).
"""
import argparse

from nanocausal import cli, memory_plan
from nanocausal.rl import RLConfig, train_rl


def build_parser(algo="grpo"):
    """The flags of one algorithm: `--algo grpo --help` lists GRPO's, `--algo ppo --help` PPO's."""
    parser = cli.parser_for(__doc__)
    parser.add_argument("--algo", choices=("grpo", "ppo"), default="grpo",
                        help="GRPO (group-relative advantages, no value model) or PPO (value head + GAE)")
    d = RLConfig
    g = parser.add_argument_group("rollouts")
    g.add_argument("--data", default=None, help="prompts from a JSONL (prompt, answer) or CauGym file; default: generate them")
    g.add_argument("--prompts-per-step", type=cli.positive_int, default=d.prompts_per_step, help="prompts sampled for each step")
    g.add_argument("--group-size", type=cli.positive_int, default=d.group_size if algo == "grpo" else 1,
                   help="completions sampled per prompt" + (" (the GRPO group, >= 2)" if algo == "grpo" else ""))
    g.add_argument("--max-new-tokens", type=cli.positive_int, default=d.max_new_tokens,
                   help="generation budget per completion (longer ones are cut and count as truncated)")
    g.add_argument("--rollout-slots", type=cli.positive_int, default=d.rollout_slots,
                   help="rows decoded at once (default: prompts-per-step * group-size, all of them); fewer bound the "
                        "KV cache, and a finished group's rows take the next waiting prompt (continuous batching)")
    g.add_argument("--temperature", type=cli.positive_float, default=d.temperature,
                   help="sampling temperature; the log-probs of the loss use the same one")
    g.add_argument("--top-p", type=cli.top_p, default=d.top_p,
                   help="nucleus sampling threshold (1: the full distribution, as the policy gradient assumes; below 1 the "
                        "sampler's log-probs are the truncated distribution's and the on-policy ratio is no longer 1)")
    g.add_argument("--top-k", type=cli.non_negative_int, default=d.top_k,
                   help="sample among the k most likely tokens only (0: all; see --top-p for what truncation does to the ratio)")
    g.add_argument("--format-weight", type=cli.finite_float, default=d.format_weight,
                   help="reward = correct + this * (the response ends with a well-formed answer)")
    g.add_argument("--strict", action="store_true", help="score only the last answer of a response (the official rule accepts any)")
    g.add_argument("--rewards", default=None, help="comma-separated named rewards (nanocausal.rewards.REWARDS: correct, "
                   "correct_strict, format, lack_condition, length) summed with --reward-weights and logged one by one "
                   "as reward/NAME; default: correct + format-weight * format")
    g.add_argument("--reward-weights", default=None, help="comma-separated weights of --rewards (default: 1 each)")
    g.add_argument("--reward", default=d.reward, choices=("outcome", "step"),
                   help="step: per-token credit from the exact solver's check of every intermediate step of a tiny "
                        "worked solution (nanocausal/step_rewards.py); outcome: the answer's reward on every token")
    g.add_argument("--curriculum", default=d.curriculum, choices=("fixed", "adaptive"),
                   help="adaptive: generate tiny problems whose number of borrows follows the pass rate towards "
                        "--curriculum-target (nanocausal/curriculum.py); fixed: --data or the generator as set")
    g.add_argument("--curriculum-target", type=cli.probability, default=d.curriculum_target,
                   help="with --curriculum adaptive: the group pass rate the difficulty knob keeps each step near")
    g.add_argument("--mask-truncated", action="store_true",
                   help="completions cut at max-new-tokens carry no loss (they still count in their group's advantages)")
    g.add_argument("--overlong-buffer", type=cli.non_negative_int, default=d.overlong_buffer,
                   help="DAPO's soft overlong penalty: the reward falls linearly to -overlong-penalty over the last this "
                        "many tokens of max-new-tokens (0: off)")
    g.add_argument("--overlong-penalty", type=cli.non_negative_float, default=d.overlong_penalty,
                   help="the overlong penalty at max-new-tokens")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: drop groups whose rewards are all equal and roll out prompts-per-step more prompts until "
                        "the step has prompts-per-step informative groups (or max-sampling-rounds rounds)")
    g.add_argument("--max-sampling-rounds", type=cli.positive_int, default=d.max_sampling_rounds,
                   help="with --dynamic-sampling: at most this many rounds of prompts per step")
    g = parser.add_argument_group("update")
    g.add_argument("--ppo-epochs", "--num-iterations", type=cli.positive_int, default=d.ppo_epochs,
                   help="passes over each rollout batch (1: strictly on-policy)")
    g.add_argument("--mini-batches", type=cli.positive_int, default=d.mini_batches, help="optimiser steps per pass over the rollout batch")
    g.add_argument("--micro-batch-size", type=cli.positive_int, default=d.micro_batch_size,
                   help="sequences per forward/backward; gradients accumulate over the mini-batch")
    g.add_argument("--micro-batch-tokens", type=cli.non_negative_int, default=d.micro_batch_tokens,
                   help="also at most this many padded tokens per forward/backward (0: no limit): memory follows "
                        "tokens, not sequences; the loss is the same")
    g.add_argument("--logits-chunk-size", type=cli.positive_int, default=d.logits_chunk_size,
                   help="completion tokens whose float32 logits exist at once (memory: this x vocabulary x 4 bytes, a few times)")
    if algo == "grpo":
        g = parser.add_argument_group("GRPO (nanocausal.rl.GRPO: grpo_losses.group_advantages, grpo_losses.grpo_loss)")
        g.add_argument("--beta", type=cli.non_negative_float, default=d.beta,
                       help="weight of the k3 KL penalty to the reference (0: no reference model is loaded)")
        g.add_argument("--eps-low", type=cli.probability, default=d.eps_low, help="the ratio is clipped below at 1 - eps-low (in [0, 1])")
        g.add_argument("--eps-high", type=cli.non_negative_float, default=d.eps_high,
                       help="the ratio is clipped above at 1 + eps-high (0.28: DAPO's clip-higher)")
        g.add_argument("--aggregation", default=d.aggregation, choices=("token_mean", "sequence_mean", "constant"),
                       help="token_mean: every token of the step weighs the same (DAPO); sequence_mean: the GRPO paper; "
                            "constant: divide by max-new-tokens (Dr. GRPO)")
        g.add_argument("--no-std-scaling", action="store_true", help="advantages r - mean without dividing by the group's std (Dr. GRPO)")
        g.add_argument("--scale-rewards", default=d.scale_rewards, choices=("group", "batch", "none"),
                       help="divide advantages by the std of the group's rewards, of the step's, or not at all")
        g.add_argument("--advantage-baseline", default=d.advantage_baseline, choices=("mean", "rloo"),
                       help="subtract the group's mean reward, or the mean of the other completions (RLOO)")
        g.add_argument("--importance-level", default=d.importance_level, choices=("token", "sequence"),
                       help="token: one ratio per token (GRPO); sequence: the length-normalised sequence ratio, "
                            "clipped per completion (GSPO; pair it with --aggregation sequence_mean)")
        g.add_argument("--objective", default=d.objective, choices=("clip", "cispo"),
                       help="clip: PPO's clipped surrogate; cispo: REINFORCE weighted by the detached ratio capped at "
                            "1 + eps-high (MiniMax-M1's CISPO: no token loses its gradient)")
        g.add_argument("--entropy-coef", type=cli.finite_float, default=d.entropy_coef,
                       help="entropy bonus: minus this times the mean token entropy is added to the loss")
        g.add_argument("--top-entropy-quantile", type=cli.number_in(0, 1, low_open=True), default=d.top_entropy_quantile,
                       help="only this top fraction of each micro-batch's tokens by entropy carries the policy loss (1: all)")
    else:
        g = parser.add_argument_group("PPO (nanocausal.rl.PPO: losses.ppo_rewards, gae, whiten, ppo_loss)")
        g.add_argument("--kl-coef", type=cli.non_negative_float, default=d.kl_coef,
                       help="per-token KL penalty in the reward (0: no reference model is loaded)")
        g.add_argument("--clip-range", type=cli.non_negative_float, default=d.clip_range, help="the policy ratio is clipped to 1 +- this")
        g.add_argument("--clip-range-value", type=cli.non_negative_float, default=d.clip_range_value,
                       help="the value moves at most this far from its rollout value")
        g.add_argument("--value-coef", type=cli.non_negative_float, default=d.value_coef, help="weight of the value loss")
        g.add_argument("--value-lr", type=cli.non_negative_float, default=d.value_lr,
                       help="learning rate of the value head (a fresh layer: it must move faster than the policy)")
        g.add_argument("--gamma", type=cli.probability, default=d.gamma, help="discount of GAE")
        g.add_argument("--lam", type=cli.probability, default=d.lam, help="lambda of GAE (0: one-step TD, 1: Monte Carlo)")
    cli.add_train_args(parser, d)
    parser.set_defaults(out_dir=f"out/{algo}")
    return parser


def main(argv=None):
    algo_parser = argparse.ArgumentParser(add_help=False)
    algo_parser.add_argument("--algo", choices=("grpo", "ppo"), default="grpo")
    args = build_parser(algo_parser.parse_known_args(argv)[0].algo).parse_args(argv)
    config = cli.config_from_args(RLConfig, args)
    if args.plan:
        return memory_plan.report(config, config.algo, args.json, args.plan_prompt_tokens, args.gpu_memory_gib,
                                  args.plan_gpus)
    return train_rl(config)


if __name__ == "__main__":
    cli.run_main(main)
