"""GRPO through nanocausal.rl.train_rl on token ids with a learnable reward (the last token is 3), as
tests/test_train_rl.py runs it in-process, but as a script, so that torchrun can start it on
several ranks: python -m torch.distributed.run --nproc-per-node 2 tests/grpo_worker.py MODEL OUT."""
import sys

import torch

from nanocausal.rl import RLConfig, train_rl


def ends_with_3(example, completion_ids):
    return float(completion_ids[-1] == 3)


def prompts(n=16, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


if __name__ == "__main__":
    model, out_dir = sys.argv[1:3]
    config = RLConfig(model=model, out_dir=out_dir, device="cpu", eval_every=0, prompts_per_step=8, group_size=4,
                      max_new_tokens=4, micro_batch_size=3, warmup_steps=0, steps=3, lr=3e-3, log_every=100,
                      mini_batches=2, overwrite=True)
    train_rl(config, reward_fn=ends_with_3, examples=prompts())
