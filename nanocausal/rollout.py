"""What online RL needs before any loss: a resumable stream of prompts, rollouts sampled from the
policy with the log-prob of every token, their rewards, and micro-batches of the rollout rows.
The rollout batch is `Rollouts` (its fields are documented there, and nowhere else).
"""
from dataclasses import dataclass, fields

import numpy as np
import torch

from nanocausal import caugym, data
from nanocausal.rewards import format_ok, reward
from nanocausal.generate import generate_many

# -----------------------------------------------------------------------------
# Prompts


class PromptStream:
    """An endless, resumable stream of prompts, read one chunk at a time.

    chunk(c) returns the examples of chunk c (each a dict with prompt_ids and whatever the reward
    reads), always the same for the same c; the position (chunk, index) is all --resume needs."""

    def __init__(self, chunk):
        self.chunk, self.position, self.current = chunk, {"chunk": 0, "index": 0}, None

    def ready(self):
        """Read the current chunk now (a bad prompt fails here, before a run writes anything)."""
        if self.current is None:
            self.current = self.chunk(self.position["chunk"])

    def next(self, n):
        out = []
        while len(out) < n:
            self.ready()
            take = self.current[self.position["index"]:self.position["index"] + n - len(out)]
            out += take
            self.position["index"] += len(take)
            if self.position["index"] >= len(self.current):
                self.position, self.current = {"chunk": self.position["chunk"] + 1, "index": 0}, None
        return out

    def state_dict(self):
        return dict(self.position)

    def load_state_dict(self, state):
        self.position, self.current = dict(state), None


def shuffled(rows, seed, epoch):
    """rows in the order of (seed, epoch): a new order each epoch."""
    return [rows[i] for i in np.random.default_rng([seed, epoch]).permutation(len(rows))]


def prompt_stream(seed, max_prompt_length, tokenizer, path=None, tasks=caugym.TASKS, variant="base", nodes=None):
    """Prompts from the file `path`, walked in a new seeded order each epoch (a chunk = an epoch);
    without a file, problems generated in chunks of 512 from (seed, chunk)."""
    if path is not None:
        examples = data.tokenize(data.load_examples(path, "rl"), tokenizer, "rl", max_prompt_length)
        return PromptStream(lambda c: shuffled(examples, seed, c))

    def generated(c):
        problems = data.generated_examples("rl", 512, seed=seed * 100_000 + c, tasks=tasks, variant=variant,
                                           nodes=nodes)
        return shuffled(data.tokenize(problems, tokenizer, "rl", max_prompt_length, progress=False), seed, c)
    return PromptStream(generated)

# -----------------------------------------------------------------------------
# Rollouts and rewards


@dataclass
class Rollouts:
    """One step's rollout batch: R = prompts * group_size rows, right-padded prompt + completion.
    Row r continues prompt r // group_size: a GRPO group is group_size contiguous rows. The (R, T)
    log-probs, values, advantages and returns are float32, 0 outside the completion tokens.

    Sampled (rollout.rollout / assemble):
      input_ids         (R, T)  the prompt then the sampled completion (EOS included), then padding
      completion_mask   (R, T)  1 on the completion tokens: the only positions any RL loss reads
      sampler_logprobs  (R, T)  the sampler's log-prob of each completion token. Never the "old"
                                policy of the ratio (the sampler's bf16 one-token path rounds
                                otherwise than the training forward): only logged, as the gap
                                |sampler - trainer|, and PPO's reward penalty reads it
      completions       R lists of completion ids;  truncated: R bools (cut at max_new_tokens)
    Added by the step (rl.py), before the update:
      ref_logprobs      (R, T)  the reference's log-probs (rl.reference_logprobs), when there is one
      old_logprobs      (R, T)  the policy's before this update, by the training forward under
                                no_grad (rl.policy_logprobs); None strictly on-policy (one epoch, one
                                mini-batch): the loss then uses its own log-probs, detached (ratio 1)
      old_values        (R, T)  PPO: the value head's estimates before the update (rl.old_values)
      advantages        (R,) GRPO (one per completion) or (R, T) PPO (GAE, whitened)
      returns           (R, T)  PPO: the value targets
      step_rewards      (R, T)  --reward step: each completion token's verified credit (step_rewards.py)
    """
    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    completions: list
    truncated: list
    ref_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    step_rewards: torch.Tensor | None = None

    def sampled_logprob_lists(self):
        """Each row's sampler log-probs of its completion tokens (what assemble takes back)."""
        return [row[m].tolist() for row, m in zip(self.sampler_logprobs, self.completion_mask.bool())]

    def micro_batches(self, rows, size, max_tokens=0):
        """Yield (row index, micro-batch as Rollouts) for `rows` sorted by length and cut
        (data.cut) into at most `size` rows and max_tokens padded tokens, each trimmed to its
        longest row. Rows are right-padded, so plain causal attention (no mask: the fast path) is
        exact on every real token; what padding computes is masked out by completion_mask."""
        last = self.completion_mask.cumsum(1).argmax(1).tolist()  # last real position of each row
        rows = sorted(rows, key=lambda r: last[r])
        for chunk in data.cut(rows, size, max_tokens, lambda c: len(c) * (max(last[r] for r in c) + 1)):
            index, width = torch.tensor(chunk, device=self.input_ids.device), max(last[r] for r in chunk) + 1

            def select(value):  # (B, width) of an (R, T) tensor, (B,) of an (R,) one, B items of a list
                if not torch.is_tensor(value):
                    return None if value is None else [value[r] for r in chunk]
                return value[index, :width] if value.dim() == 2 else value[index]
            yield index, Rollouts(**{f.name: select(getattr(self, f.name)) for f in fields(self)})


@torch.no_grad()
def rollout(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, seed, eos_token_ids, pad_token_id,
            vocab_size=None, slots=None, prompt_keys=None, compile_decode=False):
    """Sample group_size completions per prompt (a list of token-id lists): their `Rollouts`.

    Decoding is continuous batching (generate.generate_many) over `slots` rows (default: all of
    them). Prompt i's samples are drawn from the random streams of (seed, prompt_keys[i]) (default
    i), so they do not depend on the slot count."""
    generation = generate_many(model, prompts, max_new_tokens, slots=slots or len(prompts) * group_size,
                               temperature=temperature, top_p=top_p, top_k=top_k, num_samples=group_size,
                               eos_token_ids=eos_token_ids, seed=seed, pad_token_id=pad_token_id,
                               vocab_size=vocab_size, prompt_keys=prompt_keys, compile_decode=compile_decode)
    mask = generation.completion_mask.bool()
    return assemble([prompts[i] for i in generation.prompt_index.tolist()], generation.completions(),
                    [row[m].tolist() for row, m in zip(generation.logprobs, mask)],
                    [s == "length" for s in generation.stop_reason], pad_token_id, generation.tokens.device)


def assemble(row_prompts, completions, sampled_logprobs, truncated, pad_token_id, device):
    """The `Rollouts` of these rows from each row's prompt and completion ids, the sampler's log-prob
    of each completion token, and whether it hit max_new_tokens."""
    batch = data.pad_batch([p + c for p, c in zip(row_prompts, completions)], pad_token_id,
                           [[0] * len(p) + [1] * len(c) for p, c in zip(row_prompts, completions)])
    sampler_logprobs = torch.zeros(batch["input_ids"].shape)
    for row, (prompt, logprobs) in enumerate(zip(row_prompts, sampled_logprobs)):
        sampler_logprobs[row, len(prompt):len(prompt) + len(logprobs)] = torch.tensor(logprobs)
    return Rollouts(batch["input_ids"].to(device), batch["completion_mask"].to(device),
                    sampler_logprobs.to(device), completions, truncated)


def score(examples, completions, tokenizer, format_weight=0.1, strict=False, reward_terms=None):
    """Rewards (R,), whether each answer is officially correct and whether it is well formed.
    reward_terms, [(name, function, weight)] from rewards.parse_rewards: reward = sum of weight *
    function(response, answer), each term's values kept as "reward/<name>"."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    pairs = list(zip(examples, texts))
    scores = {"correct": torch.tensor([float(caugym.is_correct(t, ex["answer"])) for ex, t in pairs]),
              "format_ok": torch.tensor([format_ok(t, ex["answer"]) for ex, t in pairs])}
    if reward_terms is None:
        scores["reward"] = torch.tensor([reward(t, ex["answer"], format_weight, strict) for ex, t in pairs])
        return scores
    scores["reward"] = torch.zeros(len(pairs))
    for name, function, weight in reward_terms:
        scores[f"reward/{name}"] = torch.tensor([float(function(t, ex["answer"])) for ex, t in pairs])
        scores["reward"] += weight * scores[f"reward/{name}"]
    return scores
