"""
Datasets for every trainer: read examples, turn them into token ids, and cut them into batches.

One example is a dict with TRL's field names; which fields a trainer needs is its `kind`:

    sft  prompt, completion                  supervised fine-tuning
    dpo  prompt, chosen, rejected            preference pairs
    kto  prompt, completion, label           unpaired examples, label true = desirable
    rl   prompt, answer (+ type, variant)    prompts to sample from, scored against the answer

`prompt` is the user message as a string, or TRL's conversational form (a list of
{"role", "content"} messages); completions are strings or a one-message list
[{"role": "assistant", "content": ...}]. Three sources give such examples:

  - JSONL files with those fields (what `python -m nanocausal.problems` writes, or any TRL dataset);
  - CauGym files (.json lists or .jsonl) with fields problem / answer / Type: the prompt is then
    the official user message, caugym.official_prompt(problem, variant);
  - nanocausal.problems itself, generating problems on the fly from a seed (`generated_examples`).

Tokenising (`tokenize`) renders the prompt with the model's own chat template and appends the
completion and its end-of-turn token (Tokenizer.encode_chat_completion). An example longer than the
context is an error naming its file and line, never silently truncated: a cut-off completion would
teach the model to stop mid-answer or not at all.
"""

import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from nanocausal import caugym, problems, safe_files

FIELDS = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "rl": ("prompt", "answer"),
}

# -----------------------------------------------------------------------------
# Reading files


def read_records(path):
    """The raw JSON objects of a .jsonl file (one per line) or a .json file (a list of objects),
    each with "_where": "file:LINE" (or "file: item N") for error messages."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    located = safe_files.read_records(path, json_list=path.endswith(".json"))
    for record, where in located:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return [{**record, "_where": where} for record, where in located]


def normalise(record, kind, variant="base"):
    """One raw record -> an example of `kind` (see the module docstring), or a ValueError naming
    its file and line. CauGym records (problem, answer, Type) get the official prompt."""
    where = record["_where"]
    example = dict(record)
    if "problem" in record and "prompt" not in record:
        if not isinstance(record["problem"], str):
            raise ValueError(f"{where}: field 'problem' must be a string, got {type(record['problem']).__name__}")
        example["prompt"] = caugym.official_prompt(record["problem"], record.get("variant", variant))
        example.setdefault("type", record.get("Type"))
        example.setdefault("variant", record.get("variant", variant))
    for field in FIELDS[kind]:
        if field not in example:
            raise ValueError(f"{where}: missing field '{field}' (a {kind} example needs {', '.join(FIELDS[kind])})")
    example["prompt"] = prompt_messages(example["prompt"], where)
    for field in ("completion", "chosen", "rejected"):
        if field in FIELDS[kind]:
            example[field] = completion_text(example[field], where, field)
    if kind == "kto" and not isinstance(example["label"], bool):
        raise ValueError(f"{where}: field 'label' must be true or false, got {example['label']!r}")
    if kind == "rl":
        check_answer(example["answer"], where)
    return example


def check_answer(answer, where="answer"):
    """A gold answer scores responses (caugym.is_correct): it must be LACK_CONDITION or an answer
    JSON with a finite PROB, such as '{"ANSWER": "Yes", "PROB": "0.1234"}'; refused at load, with
    its file and line, rather than in the middle of a run."""
    expected = f"field 'answer' must be \"{caugym.LACK}\" or a JSON string such as '{{\"PROB\": \"0.1234\"}}'"
    if not isinstance(answer, str):
        raise ValueError(f"{where}: {expected}, got {type(answer).__name__}")
    if answer.strip() == caugym.LACK:
        return
    try:
        prob = caugym.gold_prob(answer)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise ValueError(f"{where}: {expected}, got {answer[:80]!r}") from None
    if not math.isfinite(prob):
        raise ValueError(f"{where}: field 'answer' has a PROB that is not a finite number: {answer[:80]!r}")


def prompt_messages(prompt, where="prompt"):
    """A prompt string (the user message) or a list of messages -> a list of messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in prompt):
        return prompt
    raise ValueError(f"{where}: field 'prompt' must be a string or a list of {{\"role\", \"content\"}} messages "
                     f"whose role and content are strings")


def completion_text(completion, where="completion", field="completion"):
    """A completion string, or TRL's conversational [{"role": "assistant", "content": ...}] -> text."""
    if isinstance(completion, str):
        return completion
    if (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)
            and completion[0].get("role") == "assistant" and isinstance(completion[0].get("content"), str)):
        return completion[0]["content"]
    raise ValueError(f"{where}: field '{field}' must be a string or a single assistant message")


def load_examples(path, kind, variant=None):
    """Every example of a JSONL / CauGym file, checked for `kind` (sft, dpo, kto, rl)."""
    stem = os.path.splitext(os.path.basename(str(path)))[0]
    variant = variant or (stem if stem in caugym.VARIANTS else "base")  # CauGym names files by variant
    examples = [normalise(record, kind, variant) for record in read_records(path)]
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def generated_examples(kind, n, seed, tasks=caugym.TASKS, variant="base", nodes=None, split="train"):
    """n examples of `kind` generated by nanocausal.problems from `seed` (the same seed, the same
    data: this is how --resume finds the data again without a file). They are the rows the
    generator's CLI writes (`python -m nanocausal.problems --format KIND`), so training on the fly
    equals training on its files: sft completions are worked solutions, dpo/kto rejected ones
    plausible wrong answers."""
    items = problems.problems(n, tasks=tasks, variant=variant, nodes=nodes, seed=seed, split=split)
    return [normalise({**row, "_where": f"problems.problems(split={split!r}, seed={seed}) item {i}"}, kind, variant)
            for i, row in enumerate(problems.dataset_rows(items, kind, seed))]


def write_jsonl(path, rows):
    """One JSON object per line (the format every dataset and log here is read back from)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# -----------------------------------------------------------------------------
# Tokenising


def _encode(tokenizer, example, completion, max_length, what):
    try:
        ids, completion_mask = tokenizer.encode_chat_completion(example["prompt"], completion)
    except ValueError as e:  # the chat template refused or failed on this example
        raise ValueError(f"{example['_where']}: {e}") from None
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"{example['_where']}: prompt + {what} is {len(ids)} tokens, longer than the "
                         f"context of {max_length} tokens (raise --max-length, or drop the example)")
    return ids, completion_mask


def tokenize(examples, tokenizer, kind, max_length=None, progress=True):
    """Examples -> rows of token ids for a trainer of `kind`:

        sft  {ids, completion_mask}
        dpo  {chosen_ids, chosen_mask, rejected_ids, rejected_mask}
        kto  {ids, completion_mask, label, kl_ids, kl_mask}
        rl   {prompt_ids, answer, type, variant}

    KTO's kl_ids pair the prompt of example i with the completion of another example (the next one
    in the dataset whose prompt differs): these mismatched pairs estimate KL(policy || reference)
    for the reference point z0 (see losses.kto_loss). TRL pairs within each batch of its dataset
    map; fixing the pair per example instead lets their reference log-probs be precomputed.
    """
    rows = []
    for i, example in enumerate(tqdm(examples, desc=f"tokenising {kind}", disable=not progress, leave=False)):
        if kind == "sft":
            ids, mask = _encode(tokenizer, example, example["completion"], max_length, "completion")
            rows.append({"ids": ids, "completion_mask": mask})
        elif kind == "dpo":
            chosen_ids, chosen_mask = _encode(tokenizer, example, example["chosen"], max_length, "chosen")
            rejected_ids, rejected_mask = _encode(tokenizer, example, example["rejected"], max_length, "rejected")
            rows.append({"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                         "rejected_ids": rejected_ids, "rejected_mask": rejected_mask})
        elif kind == "kto":
            ids, mask = _encode(tokenizer, example, example["completion"], max_length, "completion")
            other = _mismatched(examples, i)
            kl_ids, kl_mask = _encode(tokenizer, example, examples[other]["completion"], max_length,
                                      f"the completion of example {other} (KTO's KL pair)")
            rows.append({"ids": ids, "completion_mask": mask, "label": example["label"],
                         "kl_ids": kl_ids, "kl_mask": kl_mask})
        else:  # rl
            try:
                prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True)
            except ValueError as e:
                raise ValueError(f"{example['_where']}: {e}") from None
            if max_length is not None and len(prompt_ids) >= max_length:
                raise ValueError(f"{example['_where']}: prompt is {len(prompt_ids)} tokens, no room left in the "
                                 f"context of {max_length} tokens")
            rows.append({"prompt_ids": prompt_ids, "answer": example["answer"], "type": example.get("type"),
                         "variant": example.get("variant")})
    return rows


def _mismatched(examples, i):
    n = len(examples)
    for offset in range(1, n):
        j = (i + offset) % n
        if examples[j]["prompt"] != examples[i]["prompt"]:
            return j
    raise ValueError("KTO needs at least two different prompts in its dataset (for the KL estimate)")


# -----------------------------------------------------------------------------
# Batching


def pad_batch(sequences, pad_id, masks):
    """Lists of token ids and their masks -> {input_ids, attention_mask, completion_mask}, each
    (B, T), right-padded."""
    T = max(len(s) for s in sequences)

    def padded(lists, fill):
        return torch.tensor([list(x) + [fill] * (T - len(x)) for x in lists], dtype=torch.long)
    attention = [[1] * len(s) for s in sequences]
    return {"input_ids": padded(sequences, pad_id), "attention_mask": padded(attention, 0),
            "completion_mask": padded(masks, 0)}


class Batches:
    """Endless, resumable stream of index lists: each epoch a permutation of range(num_examples)
    drawn from (seed, epoch), cut into batches of batch_size (the last incomplete one dropped, so
    every step sees the same number of examples). state_dict() is the position of the next batch."""

    def __init__(self, num_examples, batch_size, seed=0):
        if num_examples < batch_size:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than one batch of {batch_size}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.epoch, self.index = 0, 0

    def next(self):
        if self.index + self.batch_size > self.num_examples:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        batch = order[self.index:self.index + self.batch_size].tolist()
        self.index += self.batch_size
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


def collate_sft(rows, pad_id):
    """{input_ids, attention_mask, completion_mask}, each (B, T), right-padded."""
    return pad_batch([r["ids"] for r in rows], pad_id, [r["completion_mask"] for r in rows])


def collate_dpo(rows, pad_id):
    """Chosen rows then rejected rows in one (2B, T) batch, so one forward pass scores both halves
    (rows i and B + i are the two completions of pair i)."""
    return pad_batch([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_id,
                     [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows])


def collate_kto(rows, pad_id):
    """The examples (B, T) with their labels (B,), and their mismatched KL pairs (B, T')."""
    kl_pairs = pad_batch([r["kl_ids"] for r in rows], pad_id, [r["kl_mask"] for r in rows])
    return {**collate_sft(rows, pad_id), "desirable": torch.tensor([r["label"] for r in rows]),
            **{"kl_" + key: value for key, value in kl_pairs.items()}}


COLLATE = {"sft": collate_sft, "dpo": collate_dpo, "kto": collate_kto}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def cut(items, size, max_tokens=0, padded_tokens=None):
    """`items` cut, in order, into lists of at most `size`, and (max_tokens > 0) of at most
    max_tokens padded tokens, padded_tokens(list) counting them; an item over the budget goes
    alone. The one micro-batch cutter of every trainer: the losses normalise over the whole step,
    so the cut changes memory, not the gradient."""
    chunks, chunk = [], []
    for i in items:
        if chunk and (len(chunk) == size or (max_tokens and padded_tokens(chunk + [i]) > max_tokens)):
            chunks.append(chunk)
            chunk = []
        chunk.append(i)
    return chunks + [chunk] if chunk else chunks


def micro_batches(rows, indices, collate, pad_id, batch_size, device, max_tokens=0):
    """One step's examples (`indices` into rows) cut into micro-batches (`cut`: at most batch_size,
    and max_tokens counting every (B, T) id tensor the collate makes: DPO's chosen and rejected
    rows, KTO's KL pairs), collated and on the device; each batch carries its example indices (a
    precomputed reference looks them up)."""
    def tokens(chunk):
        batch = collate([rows[i] for i in chunk], pad_id)
        return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))

    return [{**to_device(collate([rows[i] for i in chunk], pad_id), device), "indices": torch.tensor(chunk)}
            for chunk in cut(indices, batch_size, max_tokens, tokens)]


# -----------------------------------------------------------------------------
# Held-out evaluation problems


def eval_problems(path=None, n=64, seed=0, tasks=caugym.TASKS, variant="base", nodes=None):
    """Problems to evaluate on, as `rl` examples {prompt, answer, type, variant}: the first n of
    `path` (a CauGym or rl file), or n generated from the "eval" split, whose causal models the
    "train" split never uses, so that the score measures generalisation, not memory."""
    if path is not None:
        return load_examples(path, "rl")[:n]
    return generated_examples("rl", n, seed, tasks=tasks, variant=variant, nodes=nodes, split="eval")
