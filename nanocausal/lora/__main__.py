"""python -m nanocausal.lora merge ADAPTER_FOLDER OUT_FOLDER: a LoRA adapter (ours or peft's) merged
into its base model, W <- W + (alpha / r) B A, written as a full Hugging Face folder that
transformers and vLLM load like any checkpoint.

    python -m nanocausal.lora merge out/grpo/checkpoint out/grpo-merged
"""
import torch

from nanocausal import checkpoint, cli
from nanocausal.lora import merge


def main(argv=None):
    parser = cli.parser_for(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_parser = sub.add_parser("merge", help="write base + adapter as one Hugging Face folder")
    merge_parser.add_argument("adapter", help="a peft LoRA folder (adapter_config.json + adapter_model.safetensors)")
    merge_parser.add_argument("out", help="the folder to write (config.json, model.safetensors, tokenizer files)")
    merge_parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the written weights")
    args = parser.parse_args(argv)
    model = merge(checkpoint.load_model(args.adapter, dtype=getattr(torch, args.dtype)))
    checkpoint.save_model(model, args.out)
    checkpoint.copy_tokenizer_files(args.adapter, args.out)
    print(f"{args.out}: {args.adapter} merged into its base")


if __name__ == "__main__":
    cli.run_main(main)
