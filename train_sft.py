"""
Supervised fine-tuning (SFT) on causal-reasoning problems: cross-entropy on the completion tokens
only, the prompt being the official CauGym user message rendered with the model's chat template.

One GPU (bf16 autocast, problems generated on the fly by nanocausal.problems):

    python train_sft.py --model Qwen/Qwen2.5-1.5B-Instruct --num-train 20000 --batch-size 8 \\
        --grad-accum 4 --steps 2000 --lr 1e-5 --activation-checkpointing --out-dir out/sft

Laptop (CPU, a 135M model; each micro-batch of 2 examples, about 900 tokens, takes seconds):

    python train_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --num-train 512 --batch-size 2 \\
        --grad-accum 2 --steps 20 --lr 5e-5 --eval-every 10 --eval-problems 8 --eval-max-new-tokens 256 \\
        --out-dir out/sft-laptop

From a file instead: --data data/sft.jsonl (fields prompt, completion; or a CauGym file).
Interrupt with Ctrl-C: the script writes a checkpoint first; rerun the same command with --resume
to continue exactly where it stopped. The result, out-dir/checkpoint, is a Hugging Face folder.

Where things are: the step (completion-only cross-entropy, gradient accumulation) is
nanocausal/offline.py (beside DPO's and KTO's), its loss losses.sft_loss, the loop (schedule,
logging, evaluation, checkpoints, Ctrl-C, resume) nanocausal/training.py. This file only turns
flags into an SFTConfig (nanocausal/config.py: every flag is a field there, its help the field's
description).
Several GPUs: the same flags under torchrun (FSDP2; README "More GPUs"), the batch being global:
    torchrun --standalone --nproc-per-node 8 train_sft.py --model Qwen/Qwen2.5-1.5B-Instruct ...
Not implemented: packing several examples into one row.
"""
from nanocausal import cli
from nanocausal.offline import SFTConfig, train_offline


def main():
    config = cli.config_from_flags(__doc__, SFTConfig)  # None when --plan printed the memory plan instead
    if config is not None:
        train_offline(config)


if __name__ == "__main__":
    cli.run_main(main)
