"""
Offline preference optimisation: DPO on (prompt, chosen, rejected) pairs, or KTO on unpaired
(prompt, completion, label) examples, against a frozen reference model (the starting model).

One GPU (bf16 autocast; pairs generated on the fly: worked solutions vs plausible wrong ones):

    python train_pref.py --algo dpo --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 4 \\
        --grad-accum 8 --steps 1000 --lr 5e-7 --beta 0.1 --activation-checkpointing --out-dir out/dpo
    python train_pref.py --algo kto --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 8 \\
        --grad-accum 4 --steps 1000 --lr 5e-7 --beta 0.1 --activation-checkpointing --out-dir out/kto

Laptop (CPU, a 135M model; reference log-probs computed once, then the reference is freed):

    python train_pref.py --algo dpo --model HuggingFaceTB/SmolLM2-135M-Instruct --num-train 128 \\
        --batch-size 2 --grad-accum 2 --steps 20 --lr 1e-6 --precompute-ref --eval-every 10 \\
        --eval-problems 8 --eval-max-new-tokens 256 --out-dir out/dpo-laptop

Usually one starts from an SFT checkpoint: --model out/sft/checkpoint. From files: --data dpo.jsonl
(prompt, chosen, rejected) or kto.jsonl (prompt, completion, label), e.g. written by
`python -m nanocausal.problems --format dpo --n 20000 --out dpo.jsonl`. Ctrl-C writes a checkpoint;
rerun with --resume to continue exactly. Several GPUs: the same flags under torchrun (FSDP2, the
reference sharded like the policy; README "More GPUs"):
    torchrun --standalone --nproc-per-node 8 train_pref.py --algo dpo --model out/sft/checkpoint ...

Where things are: the DPO and KTO steps and the frozen reference are nanocausal/offline.py,
their losses losses.dpo_loss and losses.kto_loss (each with its formula), the loop (schedule,
logging, evaluation, checkpoints, Ctrl-C, resume) nanocausal/training.py. This file only turns
flags into a PreferenceConfig.
"""
from nanocausal import cli, memory_plan
from nanocausal.offline import PreferenceConfig, train_preference


def build_parser():
    parser = cli.parser_for(__doc__)
    g = parser.add_argument_group("preference optimisation")
    g.add_argument("--algo", choices=["dpo", "kto"], default="dpo",
                   help="dpo: pairs (prompt, chosen, rejected); kto: (prompt, completion, label)")
    g.add_argument("--beta", type=cli.non_negative_float, default=PreferenceConfig.beta,
                   help="strength of the implicit KL penalty (DPO/KTO beta; > 0 for IPO, whose target is 1 / (2 beta))")
    g.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO loss: the paper's sigmoid, or IPO")
    g.add_argument("--label-smoothing", type=cli.number_in(0, 0.5), default=0.0,
                   help="DPO: probability that a preference label is flipped (cDPO), in [0, 0.5]")
    g.add_argument("--desirable-weight", type=cli.non_negative_float, default=1.0, help="KTO: lambda_D, weight of desirable examples")
    g.add_argument("--undesirable-weight", type=cli.non_negative_float, default=1.0,
                   help="KTO: lambda_U, weight of undesirable examples")
    g.add_argument("--ref-model", default=None, help="reference model (default: --model, the starting point)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="score every example with the reference once, before training, then free it (saves memory and time)")
    cli.add_offline_data_args(parser, PreferenceConfig,
                              data_help="dpo.jsonl (prompt, chosen, rejected) or kto.jsonl (prompt, completion, label); default: generate them",
                              batch_help="pairs (DPO) or examples (KTO) per micro-batch")
    cli.add_train_args(parser, PreferenceConfig)
    parser.set_defaults(out_dir=None)  # out/<algo>
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = cli.config_from_args(PreferenceConfig, args, out_dir=args.out_dir or f"out/{args.algo}")
    if args.plan:
        return memory_plan.report(config, config.algo, args.json, args.plan_prompt_tokens, args.gpu_memory_gib,
                                  args.plan_gpus)
    return train_preference(config)


if __name__ == "__main__":
    cli.run_main(main)
