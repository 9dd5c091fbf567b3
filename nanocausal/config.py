"""Every setting of a training run, in one place: each field is also its flag (cli.setting), and
the config refuses what the flag would.

    TrainConfig          what the loop reads (training.py): model, optimisation, hardware, LoRA,
                         evaluation, output
    SFTConfig            + the offline data and batches (offline.py: SFT)
    PreferenceConfig     + DPO's and KTO's settings (offline.py)
    RLConfig             + rollouts, the update, GRPO's and PPO's settings (rl.py)

A subclass that only changes a default writes a plain `name: type = value` (RLConfig's steps, lr,
...): the help and type stay its base's.
"""
from dataclasses import dataclass

import torch

from nanocausal import caugym, cli, lora
from nanocausal.cli import setting
from nanocausal.rewards import parse_rewards


@dataclass
class TrainConfig:
    """What the loop reads, shared by every trainer's config (each adds its own settings)."""
    model: str = setting("Qwen/Qwen2.5-0.5B-Instruct", "hub id or local Hugging Face folder to start from",
                         resume="content", group="model and generated problems")
    tasks: tuple = setting(caugym.TASKS, "comma-separated causal tasks of generated problems (ATE,CDE,ETT,NDE,NIE,PN,PS)",
                           type=cli.task_list)
    variant: str = setting("base", f"problem variant of generated problems ({', '.join(caugym.VARIANTS)}; RL: a "
                           "comma-separated mix)", type=cli.variant_list)
    nodes: str | None = setting(None, "graph sizes of generated problems: N or LO-HI (default: the generator's, 3-5 "
                                "nodes for base)", type=cli.graph_sizes)
    steps: int = setting(1000, "number of optimiser steps (RL: rollout batches)", type=cli.positive_int, resume="free",
                         group="optimisation")
    lr: float = setting(1e-5, "peak learning rate of AdamW", type=cli.non_negative_float)
    warmup_steps: int = setting(20, "linear warmup steps before the cosine decay", type=cli.non_negative_int)
    min_lr_ratio: float = setting(0.1, "the cosine decays to this fraction of --lr (1: constant)", type=cli.probability)
    weight_decay: float = setting(0.0, "AdamW weight decay (on matrices only)", type=cli.non_negative_float)
    clip: float = setting(1.0, "clip the gradient norm to this value (0: no clipping)", type=cli.non_negative_float)
    seed: int = setting(0, "seed of the data, its order, the sampler and the model's randomness", type=cli.seed)
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu (default: cuda when available)",
                          type=cli.device, resume="free", group="hardware")
    dtype: str = setting("float32", "weight dtype; float32 weights + bf16 autocast on CUDA is the standard mixed "
                         "precision", choices=("float32", "bfloat16"))
    activation_checkpointing: bool | None = setting(
        None, "recompute each block in backward to save memory (default: on for CUDA, off on CPU)", resume="free")
    cpu_offload: bool = setting(False, "under torchrun: FSDP keeps the parameter shards, gradients and optimiser state "
                                "in CPU memory (slower steps, room for a larger model; needs --device cuda)", resume="free")
    lora_rank: int = setting(0, "rank r of the adapters (0: full fine-tuning); with LoRA use about 10x the "
                             "full-fine-tuning lr", type=cli.non_negative_int, resume="fixed",
                             group="LoRA (nanocausal/lora: y = W x + (alpha / r) B A x, base frozen)")
    lora_alpha: float = setting(32.0, "the adapters' scale is alpha / r", type=cli.non_negative_float, resume="fixed")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input", type=cli.below_one, resume="fixed")
    lora_targets: tuple = setting(lora.TARGETS, "comma-separated linear layers of each block that get adapters",
                                  type=cli.name_list, resume="fixed")
    eval_every: int = setting(200, "evaluate before the first step and every this many steps (0: never)",
                              type=cli.non_negative_int, resume="free",
                              group="evaluation (official CauGym scoring on held-out problems, through the sampler)")
    eval_data: str | None = setting(None, "CauGym/rl file to evaluate on; default: held-out generated problems",
                                    resume="free")
    eval_problems: int = setting(64, "number of held-out problems", type=cli.positive_int, resume="free")
    eval_samples: int = setting(1, "samples per problem (official: 5)", type=cli.positive_int, resume="free")
    eval_batch_size: int = setting(32, "problems decoded at once (continuous batching: x eval-samples rows)",
                                   type=cli.positive_int, resume="free")
    eval_max_new_tokens: int = setting(1024, "generation budget per sample", type=cli.positive_int, resume="free")
    eval_temperature: float = setting(0.6, "sampling temperature, 0 = greedy (official: 0.6)",
                                      type=cli.non_negative_float, resume="free")
    eval_top_p: float = setting(0.95, "nucleus sampling threshold (official: 0.95)", type=cli.top_p, resume="free")
    show_completions: int = setting(0, "evaluation completions printed each time", type=cli.non_negative_int,
                                    resume="free")
    out_dir: str | None = setting(None, "writes checkpoint/ (a Hugging Face folder) and metrics.jsonl here (default: "
                                  "out/ALGO: out/sft, out/dpo, ...)", resume="free", group="output")
    save_every: int = setting(500, "write a checkpoint every this many steps (and at the end, and on Ctrl-C)",
                              type=cli.positive_int, resume="free")
    log_every: int = setting(10, "print a progress line every this many steps", type=cli.positive_int, resume="free")
    report_to: str = setting("none", "also send every metrics.jsonl row to wandb, trackio or tensorboard "
                             "(comma-separated; offline when there is no network; see nanocausal/tracking.py)",
                             type=cli.report_backends, resume="free")
    run_name: str | None = setting(None, "the run's name in the tracker (default: out-dir's folder name)", resume="free")
    project: str = setting("nanocausal", "the wandb / trackio project", resume="free")
    keep: int = setting(1, "checkpoints kept: out-dir/checkpoint and the keep - 1 before it (out-dir/checkpoint-STEP)",
                        type=cli.positive_int, resume="free")
    resume: bool = setting(False, "continue exactly from out-dir/checkpoint (weights, optimiser, data position, RNG); "
                           "from step 0 when there is none yet", resume="free")
    overwrite: bool = setting(False, "start again in an out-dir that already holds a run (deletes it)", resume="free")
    allow_changed_args: bool = setting(False, "resume even though settings that change the run (lr, batch sizes, "
                                       "model, ...) differ from the saved ones", resume="free")

    def __post_init__(self):  # a library user's config is refused as its flags would be, before anything loads
        if self.out_dir is None:
            self.out_dir = f"out/{getattr(self, 'algo', 'sft')}"  # (SFT has no algo setting)
        if self.activation_checkpointing is None:
            self.activation_checkpointing = str(self.device).startswith("cuda")
        cli.check_config(self)
        if self.lora_rank <= 0 and (self.lora_alpha, self.lora_dropout, tuple(self.lora_targets)) != \
                (TrainConfig.lora_alpha, TrainConfig.lora_dropout, TrainConfig.lora_targets):
            raise ValueError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank > 0")


@dataclass
class SFTConfig(TrainConfig):
    data: str | None = setting(None, "JSONL with TRL fields (prompt, completion), or a CauGym .json/.jsonl; default: "
                               "generate problems", resume="content", group="data")
    num_train: int = setting(20000, "number of problems to generate when --data is not given", type=cli.positive_int)
    max_length: int = setting(2048, "context length; a longer example is an error naming its file and line",
                              type=cli.positive_int)
    batch_size: int = setting(8, "examples per micro-batch (one forward/backward)", type=cli.positive_int)
    grad_accum: int = setting(1, "micro-batches per optimiser step (effective batch = batch-size * grad-accum)",
                              type=cli.positive_int)
    micro_batch_tokens: int = setting(0, "also cut a micro-batch before it passes this many padded tokens (0: no "
                                      "limit): memory follows tokens, not examples; the loss is the same",
                                      type=cli.non_negative_int, resume="free")


@dataclass
class PreferenceConfig(SFTConfig):
    algo: str = setting("dpo", "dpo: pairs (prompt, chosen, rejected); kto: (prompt, completion, label)",
                        choices=("dpo", "kto"), resume="fixed", group="preference optimisation")
    beta: float = setting(0.1, "strength of the implicit KL penalty (DPO/KTO beta; > 0 for IPO, whose target is "
                          "1 / (2 beta))", type=cli.non_negative_float)
    loss_type: str = setting("sigmoid", "DPO loss: the paper's sigmoid, or IPO", choices=("sigmoid", "ipo"))
    label_smoothing: float = setting(0.0, "DPO: probability that a preference label is flipped (cDPO), in [0, 0.5]",
                                     type=cli.number_in(0, 0.5))
    desirable_weight: float = setting(1.0, "KTO: lambda_D, weight of desirable examples", type=cli.non_negative_float)
    undesirable_weight: float = setting(1.0, "KTO: lambda_U, weight of undesirable examples",
                                        type=cli.non_negative_float)
    ref_model: str | None = setting(None, "reference model (default: --model, the starting point)", resume="content")
    precompute_ref: bool = setting(False, "score every example with the reference once, before training, then free "
                                   "it (saves memory and time)", resume="free")
    data: str | None = setting(None, "dpo.jsonl (prompt, chosen, rejected) or kto.jsonl (prompt, completion, label); "
                               "default: generate them")
    batch_size: int = setting(8, "pairs (DPO) or examples (KTO) per micro-batch")
    lr: float = 5e-7

    def __post_init__(self):
        super().__post_init__()
        if self.algo == "dpo" and self.loss_type == "ipo" and self.beta <= 0:
            raise ValueError(f"--beta must be > 0 with --loss-type ipo (its target margin is 1 / (2 beta)), got {self.beta}")


@dataclass
class RLConfig(TrainConfig):
    algo: str = setting("grpo", "GRPO (group-relative advantages, no value model) or PPO (value head + GAE)",
                        choices=("grpo", "ppo"), resume="fixed", group="algorithm")
    data: str | None = setting(None, "prompts from a JSONL (prompt, answer) or CauGym file; default: generate them",
                               resume="content", group="rollouts")
    prompts_per_step: int = setting(32, "prompts sampled for each step", type=cli.positive_int)
    group_size: int | None = setting(None, "completions sampled per prompt (GRPO: the group, >= 2; default: 8 for "
                                     "GRPO, 1 for PPO)", type=cli.positive_int)
    max_new_tokens: int = setting(1024, "generation budget per completion (longer ones are cut and count as "
                                  "truncated)", type=cli.positive_int)
    rollout_slots: int | None = setting(None, "rows decoded at once (default: prompts-per-step * group-size, all of "
                                        "them); fewer bound the KV cache, and a finished group's rows take the next "
                                        "waiting prompt (continuous batching)", type=cli.positive_int)
    compile_decode: bool = setting(False, "torch.compile the decode step before the CUDA graphs "
                                   "capture it (gpt-fast's route: fewer, fused kernels per token; one compilation per "
                                   "process, minutes on first use)", resume="free")
    temperature: float = setting(1.0, "sampling temperature; the log-probs of the loss use the same one",
                                 type=cli.positive_float)
    top_p: float = setting(1.0, "nucleus sampling threshold (1: the full distribution, as the policy gradient assumes; "
                           "below 1 the sampler's log-probs are the truncated distribution's and the on-policy ratio is "
                           "no longer 1)", type=cli.top_p)
    top_k: int = setting(0, "sample among the k most likely tokens only (0: all; see --top-p for what truncation does "
                         "to the ratio)", type=cli.non_negative_int)
    format_weight: float = setting(0.1, "reward = correct + this * (the response ends with a well-formed answer)",
                                   type=cli.finite_float)
    strict: bool = setting(False, "score only the last answer of a response (the official rule accepts any)")
    rewards: str | None = setting(None, "comma-separated named rewards (nanocausal.rewards.REWARDS: correct, "
                                  "correct_strict, format, lack_condition, length) summed with --reward-weights and "
                                  "logged one by one as reward/NAME; default: correct + format-weight * format")
    reward_weights: str | None = setting(None, "comma-separated weights of --rewards (default: 1 each)")
    reward: str = setting("outcome", "step: per-token credit from the exact solver's check of every intermediate step "
                          "of a tiny worked solution (nanocausal/step_rewards.py); outcome: the answer's reward on "
                          "every token", choices=("outcome", "step"))
    curriculum: str = setting("fixed", "adaptive: generated tiny problems whose number of borrows follows the pass rate "
                              "towards --curriculum-target (nanocausal/curriculum.py); fixed: --data or the generator "
                              "as set", choices=("fixed", "adaptive"))
    curriculum_target: float = setting(0.5, "with --curriculum adaptive: the group pass rate the difficulty knob keeps "
                                       "each step near", type=cli.probability)
    mask_truncated: bool = setting(False, "completions cut at max-new-tokens carry no loss (they still count in their "
                                   "group's advantages; TRL's mask_truncated_completions)")
    overlong_buffer: int = setting(0, "DAPO's soft overlong penalty: the reward falls linearly to -overlong-penalty "
                                   "over the last this many tokens of max-new-tokens (0: off)", type=cli.non_negative_int)
    overlong_penalty: float = setting(1.0, "the overlong penalty at max-new-tokens", type=cli.non_negative_float)
    dynamic_sampling: bool = setting(False, "DAPO: drop groups whose rewards are all equal and roll out "
                                     "prompts-per-step more prompts until the step has prompts-per-step informative "
                                     "groups (or max-sampling-rounds rounds)")
    max_sampling_rounds: int = setting(4, "with --dynamic-sampling: at most this many rounds of prompts per step",
                                       type=cli.positive_int)
    ppo_epochs: int = setting(1, "passes over each rollout batch (1: strictly on-policy)", type=cli.positive_int,
                              group="update", flags=("--num-iterations",))
    mini_batches: int = setting(1, "optimiser steps per pass over the rollout batch", type=cli.positive_int)
    micro_batch_size: int = setting(8, "sequences per forward/backward; gradients accumulate over the mini-batch",
                                    type=cli.positive_int, resume="free")
    micro_batch_tokens: int = setting(0, "also at most this many padded tokens per forward/backward (0: no limit): "
                                      "memory follows tokens, not sequences; the loss is the same",
                                      type=cli.non_negative_int, resume="free")
    logits_chunk_size: int = setting(256, "completion tokens whose float32 logits exist at once (memory: this x "
                                     "vocabulary x 4 bytes, a few times)", type=cli.positive_int, resume="free")
    beta: float = setting(0.0, "weight of the k3 KL penalty to the reference (0: no reference model is loaded)",
                          type=cli.non_negative_float,
                          group="GRPO (nanocausal.rl.GRPO: grpo_losses.group_advantages, grpo_losses.grpo_loss)")
    eps_low: float = setting(0.2, "the ratio is clipped below at 1 - eps-low (in [0, 1])", type=cli.probability)
    eps_high: float = setting(0.2, "the ratio is clipped above at 1 + eps-high (0.28: DAPO's clip-higher)",
                              type=cli.non_negative_float)
    aggregation: str = setting("token_mean", "token_mean: every token of the step weighs the same (DAPO); "
                               "sequence_mean: the GRPO paper; constant: divide by max-new-tokens (Dr. GRPO)",
                               choices=("token_mean", "sequence_mean", "constant"))
    no_std_scaling: bool = setting(False, "advantages r - mean without dividing by the group's std (Dr. GRPO; the "
                                   "same as --scale-rewards none)")
    scale_rewards: str = setting("group", "divide advantages by the std of the group's rewards (GRPO), of the step's "
                                 "(TRL's batch), or not at all (Dr. GRPO)", choices=("group", "batch", "none"))
    advantage_baseline: str = setting("mean", "subtract the group's mean reward, or the mean of the other completions "
                                      "(RLOO)", choices=("mean", "rloo"))
    importance_level: str = setting("token", "token: one ratio per token (GRPO); sequence: the length-normalised "
                                    "sequence ratio, clipped per completion (GSPO; pair it with --aggregation "
                                    "sequence_mean)", choices=("token", "sequence"))
    objective: str = setting("clip", "clip: PPO's clipped surrogate; cispo: REINFORCE weighted by the detached ratio "
                             "capped at 1 + eps-high (MiniMax-M1's CISPO: no token loses its gradient)",
                             choices=("clip", "cispo"))
    entropy_coef: float = setting(0.0, "entropy bonus: minus this times the mean token entropy is added to the loss",
                                  type=cli.finite_float)
    top_entropy_quantile: float = setting(1.0, "only this top fraction of each micro-batch's tokens by entropy carries "
                                          "the policy loss (1: all)", type=cli.number_in(0, 1, low_open=True))
    kl_coef: float = setting(0.05, "per-token KL penalty in the reward (0: no reference model is loaded)",
                             type=cli.non_negative_float,
                             group="PPO (nanocausal.rl.PPO: losses.ppo_rewards, gae, whiten, ppo_loss)")
    clip_range: float = setting(0.2, "the policy ratio is clipped to 1 +- this", type=cli.non_negative_float)
    clip_range_value: float = setting(0.2, "the value moves at most this far from its rollout value",
                                      type=cli.non_negative_float)
    value_coef: float = setting(0.1, "weight of the value loss", type=cli.non_negative_float)
    value_lr: float = setting(1e-4, "learning rate of the value head (a fresh layer: it must move faster than the "
                              "policy)", type=cli.non_negative_float)
    gamma: float = setting(1.0, "discount of GAE", type=cli.probability)
    lam: float = setting(0.95, "lambda of GAE (0: one-step TD, 1: Monte Carlo)", type=cli.probability)
    # RL's own defaults for the loop's settings
    steps: int = 500
    lr: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 1.0
    eval_every: int = 50
    eval_temperature: float = 0.0  # greedy: a low-variance learning curve
    eval_top_p: float = 1.0
    show_completions: int = 2
    save_every: int = 50

    def __post_init__(self):  # each field's own check, then the settings no flag type can check alone
        if self.group_size is None:
            self.group_size = 8 if self.algo == "grpo" else 1
        super().__post_init__()
        if self.algo == "grpo" and self.group_size < 2:
            raise ValueError("--group-size must be >= 2 for GRPO: advantages compare completions of the same prompt")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"--overlong-buffer {self.overlong_buffer}: expected 0 (off) to --max-new-tokens "
                             f"{self.max_new_tokens} (the last tokens of the budget over which the penalty grows)")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("--dynamic-sampling needs --group-size >= 2: it keeps the groups whose rewards differ")
        if self.reward == "step" and self.rewards:
            raise ValueError("--reward step credits tokens relative to the default reward; it cannot be used with "
                             "--rewards")
        if self.curriculum == "adaptive" and self.data is not None:
            raise ValueError(f"--curriculum adaptive generates its tiny problems; it cannot read --data {self.data}")
        if self.rewards:
            parse_rewards(self.rewards, self.reward_weights)
        elif self.reward_weights:
            raise ValueError("--reward-weights needs --rewards (the names of the rewards they weigh)")
