"""python -m nanocausal.lora merge ADAPTER_FOLDER OUT_FOLDER: a LoRA adapter (ours or peft's) merged
into its base model, W <- W + (alpha / r) B A, written as a full Hugging Face folder that
transformers and vLLM load like any checkpoint.

    python -m nanocausal.lora merge out/grpo/checkpoint out/grpo-merged

OUT_FOLDER must be new or empty; --overwrite replaces an existing one whole (nothing of the old
folder, such as a trainer_state.pt, stays beside the new weights). The merged folder is written
as OUT_FOLDER.tmp and renamed into place, so an interrupted merge leaves the old OUT_FOLDER (or
none), never half of one. OUT_FOLDER may not be (or hold) the adapter or its base: both are read.
"""
import os
import shutil

import torch

from nanocausal import checkpoint, cli
from nanocausal.lora import merge


def check_out_folder(adapter, out, overwrite):
    """Refuse, in one line and before anything is loaded or written, an OUT that would destroy
    what the merge reads (compared as resolved paths: ./a/../a is a), or a non-empty one without
    --overwrite."""
    folder = checkpoint.resolve_model(adapter)
    if not checkpoint.is_adapter(folder):
        raise ValueError(f"{adapter} is not a LoRA adapter folder (it has no adapter_config.json): nothing to merge")
    base = checkpoint.adapter_base(folder)
    target = os.path.realpath(out)
    for role, path in (("the adapter", folder), ("its base model", base)):
        if target == os.path.realpath(path):
            raise ValueError(f"{out} is {role}, which the merge reads: choose another output folder")
        if os.path.commonpath([target, os.path.realpath(path)]) == target:
            raise ValueError(f"{out} holds {role} ({path}), which replacing it would delete: choose another output folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out} is not empty: pass --overwrite to replace it whole, or choose another folder")


def write_merged(model, adapter, out):
    """Write the merged model into out.tmp, then put it in place of out (whose old files go)."""
    out = out.rstrip("/")
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted merge
    checkpoint.save_model(model, tmp)
    checkpoint.copy_tokenizer_files(adapter, tmp)
    if os.path.isdir(out):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    parser = cli.parser_for(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge_parser = sub.add_parser("merge", help="write base + adapter as one Hugging Face folder")
    merge_parser.add_argument("adapter", help="a peft LoRA folder (adapter_config.json + adapter_model.safetensors)")
    merge_parser.add_argument("out", help="the folder to write (config.json, model.safetensors, tokenizer files); "
                                          "new or empty unless --overwrite")
    merge_parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the written weights")
    merge_parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT folder whole")
    args = parser.parse_args(argv)
    check_out_folder(args.adapter, args.out, args.overwrite)
    model = merge(checkpoint.load_model(args.adapter, dtype=getattr(torch, args.dtype)))
    write_merged(model, args.adapter, args.out)
    print(f"{args.out}: the adapter {args.adapter} merged into its base {checkpoint.base_of(args.adapter)}")


if __name__ == "__main__":
    cli.run_main(main)
