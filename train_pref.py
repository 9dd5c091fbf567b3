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

Where things are: the DPO and KTO steps and the frozen reference are nanocausal/offline.py, their
losses losses.dpo_loss and losses.kto_loss (each with its formula), the loop (schedule, logging,
evaluation, checkpoints, Ctrl-C, resume) nanocausal/training.py. This file only turns flags into a
PreferenceConfig (nanocausal/config.py: every flag is a field there, its help the field's
description).
"""
from nanocausal import cli
from nanocausal.offline import PreferenceConfig, train_offline


def main():
    config = cli.config_from_flags(__doc__, PreferenceConfig)  # None when --plan printed the memory plan instead
    if config is not None:
        train_offline(config)


if __name__ == "__main__":
    cli.run_main(main)
