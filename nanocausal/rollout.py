"""What online RL needs before any loss: a resumable stream of prompts, rollouts sampled from the
policy with the log-prob of every token, their rewards, and micro-batches of the rollout rows.

A rollout batch holds R = prompts * group_size rows, right-padded prompt + completion:

    input_ids        (R, T)  the prompt then the sampled completion (EOS included), then padding
    completion_mask  (R, T)  1 on the completion tokens: the only positions any RL loss reads
    old_logprobs     (R, T)  the sampler's log-prob of each completion token (0 elsewhere): the
                             "old" policy of the ratio, so an on-policy update needs no extra pass
    completions      R lists of completion ids; truncated: R bools (hit max_new_tokens)

Row r continues prompt r // group_size: a GRPO group is group_size contiguous rows.
"""
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
        self.chunk, self.position = chunk, {"chunk": 0, "index": 0}
        self.current = None

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


def prompt_stream(seed, max_prompt_length, tokenizer=None, examples=None, path=None, tasks=caugym.TASKS,
                  variant="base", nodes=None):
    """Prompts from `examples` (dicts with prompt_ids, given in Python) or from the file `path`
    are walked in a new seeded order each epoch (a chunk = an epoch); otherwise problems are
    generated in chunks of 512 from (seed, chunk)."""
    def shuffled(rows, c):
        return [rows[i] for i in np.random.default_rng([seed, c]).permutation(len(rows))]

    if examples is None and path is not None:
        examples = data.tokenize(data.load_examples(path, "rl"), tokenizer, "rl", max_prompt_length)
    if examples is not None:
        return PromptStream(lambda c: shuffled(examples, c))

    def generated(c):
        problems = data.generated_examples("rl", 512, seed=seed * 100_000 + c, tasks=tasks, variant=variant,
                                           nodes=nodes)
        return shuffled(data.tokenize(problems, tokenizer, "rl", max_prompt_length, progress=False), c)
    return PromptStream(generated)

# -----------------------------------------------------------------------------
# Rollouts and rewards


@torch.no_grad()
def rollout(model, prompts, group_size, max_new_tokens, temperature, top_p, top_k, seed, eos_token_ids, pad_token_id,
            vocab_size=None, slots=None, prompt_keys=None):
    """Sample group_size completions per prompt (a list of token-id lists); return the rollout batch
    described in the module docstring.

    Decoding is continuous batching (refill.generate_many) over `slots` rows (default: every row at
    once); with fewer slots a finished group's rows take the next waiting prompt, and the KV cache
    holds `slots` rows only. Prompt i's samples are drawn from the random streams of (seed,
    prompt_keys[i]) (default i), so they do not depend on the slot count."""
    generation = generate_many(model, prompts, max_new_tokens, slots=slots or len(prompts) * group_size,
                               temperature=temperature, top_p=top_p, top_k=top_k, num_samples=group_size,
                               eos_token_ids=eos_token_ids, seed=seed, pad_token_id=pad_token_id,
                               vocab_size=vocab_size, prompt_keys=prompt_keys)
    mask = generation.completion_mask.bool()
    return assemble([prompts[i] for i in generation.prompt_index.tolist()], generation.completions(),
                    [row[m].tolist() for row, m in zip(generation.logprobs, mask)],
                    [s == "length" for s in generation.stop_reason], pad_token_id, generation.tokens.device)


def assemble(row_prompts, completions, sampled_logprobs, truncated, pad_token_id, device):
    """The rollout batch of the module docstring from its rows: each row's prompt and completion
    ids, the sampler's log-prob of each completion token, and whether it hit max_new_tokens. (Under
    torchrun every rank assembles the whole step's batch from the rows all ranks sampled.)"""
    input_ids, _, completion_mask = data.pad_batch([p + c for p, c in zip(row_prompts, completions)], pad_token_id,
                                                   [[0] * len(p) + [1] * len(c) for p, c in zip(row_prompts, completions)])
    old_logprobs = torch.zeros(input_ids.shape)
    for row, (prompt, logprobs) in enumerate(zip(row_prompts, sampled_logprobs)):
        old_logprobs[row, len(prompt):len(prompt) + len(logprobs)] = torch.tensor(logprobs)
    return {"input_ids": input_ids.to(device), "completion_mask": completion_mask.to(device),
            "old_logprobs": old_logprobs.to(device), "completions": completions, "truncated": truncated}


def score(examples, completions, tokenizer=None, format_weight=0.1, strict=False, reward_fn=None, reward_terms=None):
    """Rewards (R,) and, for the causal reward, whether each answer is officially correct and well
    formed. reward_fn(example, completion_ids) -> float replaces the causal reward (the tests'
    trivially learnable one, which needs no tokenizer). reward_terms, [(name, function, weight)]
    from rewards.parse_rewards: reward = sum of weight * function(response, answer), each term's
    values kept as "reward/<name>"."""
    if reward_fn is not None:
        return {"reward": torch.tensor([float(reward_fn(ex, ids)) for ex, ids in zip(examples, completions)])}
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


def row_micro_batches(batch, rows, size, max_tokens=0):
    """Yield (row index, micro-batch) for `rows` cut into groups of at most `size` similar-length
    sequences, each trimmed to its longest, and (max_tokens > 0) of at most max_tokens tokens
    (rows x that width; a row longer than the budget goes alone). Rows are right-padded, so plain
    causal attention (no mask: the fast path) is exact on every real token; what padding computes
    is masked out by completion_mask."""
    last = batch["completion_mask"].cumsum(1).argmax(1).tolist()  # last real position of each row
    rows = sorted(rows, key=lambda r: last[r])
    chunks, chunk = [], []
    for r in rows:  # ascending lengths: a new row sets the width
        if chunk and (len(chunk) == size or (max_tokens and (len(chunk) + 1) * (last[r] + 1) > max_tokens)):
            chunks.append(chunk)
            chunk = []
        chunk.append(r)
    chunks += [chunk] if chunk else []
    for chunk in chunks:
        index = torch.tensor(chunk, device=batch["input_ids"].device)
        width = max(last[r] for r in chunk) + 1
        yield index, {k: v[index, :width] if v.dim() == 2 else v[index] for k, v in batch.items() if torch.is_tensor(v)}

# -----------------------------------------------------------------------------
# Groups: what dynamic sampling keeps or drops


def groups_of(batch, examples, scores, group_size):
    """The rollout batch cut into its groups (one per prompt), each a dict: example, and per row
    completions, sampler log-probs, truncated, and every score. assemble_groups puts kept groups
    from several sampling rounds back into one batch."""
    mask = batch["completion_mask"].bool()
    logprobs = [row[m].tolist() for row, m in zip(batch["old_logprobs"], mask)]
    rows = lambda values, g: values[g * group_size:(g + 1) * group_size]  # noqa: E731
    return [{"example": example, "completions": rows(batch["completions"], g), "logprobs": rows(logprobs, g),
             "truncated": rows(batch["truncated"], g), "scores": {k: rows(v, g) for k, v in scores.items()}}
            for g, example in enumerate(examples)]


def informative(group):
    """A group whose rewards are not all equal: it has a nonzero advantage (DAPO's filter)."""
    rewards = group["scores"]["reward"]
    return bool((rewards != rewards[0]).any())


def assemble_groups(groups, pad_token_id, device):
    """(rollout batch, scores) of the rows of `groups`, in order (a group's rows stay contiguous)."""
    rows = lambda key: [x for g in groups for x in g[key]]  # noqa: E731
    prompt_ids = [g["example"]["prompt_ids"] for g in groups for _ in g["completions"]]
    batch = assemble(prompt_ids, rows("completions"), rows("logprobs"), rows("truncated"), pad_token_id, device)
    scores = {k: torch.cat([g["scores"][k] for g in groups]) for k in groups[0]["scores"]}
    return batch, scores
