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
rewards nanocausal/rollout.py; the losses (each with its formula) nanocausal/grpo_losses.py (GRPO
and its options) and nanocausal/losses.py (PPO); the loop (schedule, logging, evaluation,
checkpoints, Ctrl-C, resume) nanocausal/training.py. This file only turns flags into an RLConfig
(nanocausal/config.py: every flag is a field there, its help the field's description).

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
from nanocausal import cli
from nanocausal.rl import RLConfig, train_rl


def main():
    config = cli.config_from_flags(__doc__, RLConfig)  # None when --plan printed the memory plan instead
    if config is not None:
        train_rl(config)


if __name__ == "__main__":
    cli.run_main(main)
