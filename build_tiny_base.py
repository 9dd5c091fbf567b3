"""
Build the tiny base model that `python pipeline.py` starts from (data/tiny-base, shipped in the
repository, so nobody needs to run this): a byte-level BPE tokenizer, a ~0.45M-parameter Qwen2
with a ChatML template, then generic pretraining (problem texts, copying numbers, column
subtraction; no causal task). What and why: nanocausal/tiny_base.py.

Laptop (CPU; the shipped base took 22 minutes for its first 1150 steps on the busy 2-core machine):

    python build_tiny_base.py --out base1 --steps 1150
    python build_tiny_base.py --resume-from base1 --out data/tiny-base --steps 321 --lr 2e-3 --seed 1

One GPU: the same commands (the model is too small for a GPU to help; it runs on the CPU).
"""
import tempfile

import torch

from nanocausal import cli, tiny_base


def main(argv=None):
    parser = cli.parser_for(__doc__)
    parser.add_argument("--out", default="data/tiny-base", help="output Hugging Face folder")
    parser.add_argument("--steps", type=cli.positive_int, default=1150, help="pretraining steps (batches of 32 documents)")
    parser.add_argument("--lr", type=cli.non_negative_float, default=3e-3, help="peak learning rate (50 warmup steps, then cosine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the corpus")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--resume-from", default=None, help="continue pretraining this folder instead of building a fresh model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.resume_from is None:
            tiny_base.build_tiny(scratch, seed=args.seed)
        tiny_base.pretrain(args.resume_from or scratch, args.out, args.steps, lr=args.lr, seed=args.seed)
    print(f"{args.out}: {args.steps} pretraining steps")


if __name__ == "__main__":
    cli.run_main(main)
