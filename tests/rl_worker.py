"""GRPO or PPO through nanocausal.rl.train_rl on token ids with a learnable reward (the last token is 3),
as tests/test_train_rl.py runs them in-process, but as a script, so that torchrun can start it on
several ranks:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/rl_worker.py MODEL OUT grpo|ppo|grpo-dynamic 3 [--resume]

`... MODEL OUT copy` instead writes OUT/copy-rankR.json: the rollouts' bf16 generation copy of the sharded model
(distributed.gathered_copy) against the float32 gather cast afterwards, and the dtype each shard was gathered in.
"""
import json
import os
import sys

import torch

from nanocausal import distributed, rl
from nanocausal.checkpoint import load_model
from nanocausal.rl import RLConfig, train_rl
from nanocausal.rollout import PromptStream, shuffled


class TokenIds:
    """What nanocausal.rl reads of a tokenizer, for a model that has none: EOS and padding from its
    config.json, no vocabulary limit (completions are token ids, read by the reward)."""
    vocab_size = None

    def __init__(self, model):  # a model folder, or a config.json (random weights of that shape)
        with open(model if os.path.isfile(model) else os.path.join(model, "config.json")) as f:
            config = json.load(f)
        self.eos_token_ids, self.pad_token_id = config.get("eos_token_id"), config.get("pad_token_id") or 0

    @classmethod
    def from_pretrained(cls, model):
        return cls(model)


def on_token_ids(set_attribute, reward_fn, examples):
    """Make nanocausal.rl.train_rl run on `examples` (dicts with prompt_ids, walked in a new seeded
    order each epoch, as a data file's) with reward_fn(example, completion_ids) -> float as the
    reward, and no tokenizer (TokenIds). set_attribute: monkeypatch.setattr in a test, setattr in a
    script (tests/ on sys.path)."""
    set_attribute(rl, "prompt_stream",
                  lambda seed, *args, **kwargs: PromptStream(lambda c: shuffled(examples, seed, c)))
    set_attribute(rl, "score", lambda row_examples, completions, *args, **kwargs: {
        "reward": torch.tensor([float(reward_fn(ex, ids)) for ex, ids in zip(row_examples, completions)])})
    set_attribute(rl, "Tokenizer", TokenIds)


def ends_with_3(example, completion_ids):
    return float(completion_ids[-1] == 3)


def prompts(n=16, vocab=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def compare_generation_copies(model_dir, out_dir):
    distributed.setup("cpu")
    model = distributed.shard(load_model(model_dir), "cpu")
    gathered_dtypes, real_full_tensor = [], distributed.full_tensor
    distributed.full_tensor = lambda t: gathered_dtypes.append(str(t.dtype)) or real_full_tensor(t)
    copy = distributed.gathered_copy(model, on_every_rank=True, dtype=torch.bfloat16)
    distributed.full_tensor = real_full_tensor
    float32 = distributed.full_state_dict(model)
    equal = {name: torch.equal(p, float32[name].to(torch.bfloat16)) for name, p in copy.named_parameters()}
    with open(os.path.join(out_dir, f"copy-rank{distributed.rank()}.json"), "w") as f:
        json.dump({"equal": equal, "gathered_dtypes": sorted(set(gathered_dtypes))}, f)
    distributed.teardown()


if __name__ == "__main__":
    if sys.argv[3] == "copy":
        compare_generation_copies(sys.argv[1], sys.argv[2])
        sys.exit()
    model, out_dir, algo, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dynamic_sampling = algo == "grpo-dynamic"  # GRPO with DAPO's dynamic sampling: refill rounds on every rank
    algo = "grpo" if dynamic_sampling else algo
    resume = "--resume" in sys.argv
    config = RLConfig(model=model, out_dir=out_dir, algo=algo, device="cpu", eval_every=0, prompts_per_step=8,
                      group_size=4 if algo == "grpo" else 1, max_new_tokens=4, micro_batch_size=3, warmup_steps=0,
                      steps=steps, lr=3e-3, min_lr_ratio=1.0, log_every=100, mini_batches=2, save_every=2,
                      resume=resume, overwrite=not resume, dynamic_sampling=dynamic_sampling, max_sampling_rounds=3)
    on_token_ids(setattr, ends_with_3, prompts())
    train_rl(config)
