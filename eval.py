"""
Score a model on CauGym exactly as the paper does (the official protocol of OpenCausaLab/CauGym,
eval/sample_generate.py + eval/sample_evaluate.py; see ../shared/data/caugym/README.md):

  - user message = problem + "\\n" + "Let's think step by step." (insufficient.json also gets
    'If the condition is not enough to solve the question, output "LACK_CONDITION" as final answer.'),
    rendered with the model's own chat template;
  - 5 samples per problem at temperature 0.6, top_p 0.95, at most 8192 new tokens;
  - a sample is correct when any answer JSON in it has a PROB within 0.0005 of the gold PROB
    (nanocausal.rewards.is_correct), or, for gold LACK_CONDITION, when it contains LACK_CONDITION;
  - accuracy = correct samples / all samples, per task (Type) and overall.

It prints a table (rows: the seven tasks and overall; columns: the data sets), writes every
response to <out>/responses.jsonl and the scores to <out>/summary.json. Rerunning the same command
resumes: problems whose samples are already in responses.jsonl are skipped.

`--model oracle` answers with nanocausal.scm.solve (the symbolic solver): it must score 100 %, an
upper bound and a check of the whole pipeline (prompts, files, scoring).

One GPU (the paper's protocol, full test sets):
    python eval.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --data ../shared/data/caugym/base.json ../shared/data/caugym/deconfounding.json \\
               ../shared/data/caugym/insufficient.json --batch-size 64 --out runs/eval-r1-1.5b
Laptop (CPU; a 70-problem slice of base, 10 per task, shorter replies; 19 minutes on one core):
    python eval.py --model ~/.cache/nanocausal/smollm2-135m-instruct \\
        --data ../shared/data/caugym/base.json --per-task 10 --max-new-tokens 256 --batch-size 14 \\
        --out runs/eval-smollm2
The oracle (seconds):
    python eval.py --model oracle --data ../shared/data/caugym/base.json --out runs/eval-oracle
Generated sets instead of files: --data gen:deconfounding:200 (scm.generate) or tiny:200
(the tiny curriculum of nanocausal/tiny.py).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from nanocausal import data, scm
from nanocausal.rewards import is_correct

OFFICIAL = dict(num_samples=5, temperature=0.6, top_p=0.95, max_new_tokens=8192)

# -----------------------------------------------------------------------------
# Problems


def load_dataset(spec, seed=0, tasks=scm.TASKS, nodes=None):
    """One --data entry -> (name, items); an item is {prompt (messages), problem, answer, type, variant}.

    spec is a CauGym-format .json / .jsonl file (problem, answer, Type; or prompt, answer, type),
    "gen:VARIANT:N" (N problems from nanocausal.scm.generate), or "tiny:N" / "tiny-rephrased:N"
    (the tiny curriculum)."""
    if spec.startswith(("tiny:", "tiny-rephrased:")):
        from nanocausal import tiny
        kind, n = spec.split(":")
        items = tiny.make_problems(int(n), seed=seed, rephrased=kind == "tiny-rephrased")
        return spec, [dict(item, prompt=[{"role": "user", "content": scm.official_prompt(item["problem"])}])
                      for item in items]
    if spec.startswith("gen:"):
        parts = spec.split(":")
        if len(parts) != 3 or parts[1] not in scm.VARIANTS or not parts[2].isdigit():
            raise ValueError(f"--data {spec}: expected gen:VARIANT:N with VARIANT one of {', '.join(scm.VARIANTS)}")
        rows = scm.generate(int(parts[2]), tasks=tasks, variant=parts[1], nodes=nodes, seed=seed)
        return spec, [dict(row, prompt=[{"role": "user", "content": scm.official_prompt(row["problem"], parts[1])}])
                      for row in rows]
    name = os.path.splitext(os.path.basename(spec))[0]
    return name, data.load_examples(spec, "rl")


def per_task_slice(items, per_task):
    """The first `per_task` items of each Type, in file order."""
    count, out = defaultdict(int), []
    for item in items:
        if count[item.get("type")] < per_task:
            count[item.get("type")] += 1
            out.append(item)
    return out


def item_key(dataset, index, item):
    """Identifies a problem across runs: data set, position, and a hash of its prompt (so a resumed
    run on a different file or seed never mistakes one problem for another)."""
    digest = hashlib.sha1(json.dumps(item["prompt"]).encode()).hexdigest()[:12]
    return f"{dataset}/{index}/{digest}"

# -----------------------------------------------------------------------------
# Answering


def oracle_response(item):
    problem = item.get("problem") or item["prompt"][-1]["content"]
    return scm.solve(problem)


def _completion_ids(generation, row):
    """Row `row` of a sampler result as a list of ids (the completion, its EOS included)."""
    tokens = generation.tokens[row]
    if torch.is_tensor(tokens):
        mask = generation.completion_mask[row].bool()
        tokens = tokens[: mask.numel()][mask[: tokens.numel()]]
        return tokens.tolist()
    return list(tokens)


def answer(model, tokenizer, items, num_samples, temperature, top_p, top_k, max_new_tokens, seed):
    """Responses (num_samples per item, item-major) for a batch of items."""
    if model == "oracle":
        return [[oracle_response(item)] * num_samples for item in items]
    from nanocausal.sampling import generate
    prompts = [tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True) for item in items]
    # The official 8192 new tokens do not fit every model's context (SmolLM2's is 8192 in all):
    # reply length is then capped at what the context leaves, as a serving engine would.
    longest = max(len(p) for p in prompts)
    room = model.config.max_position_embeddings - longest
    if room < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's context "
                         f"of {model.config.max_position_embeddings}")
    max_new_tokens = min(max_new_tokens, room)
    generation = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, num_samples=num_samples, eos_token_ids=tokenizer.eos_token_ids, seed=seed,
                          vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    texts = [tokenizer.decode(_completion_ids(generation, row), skip_special_tokens=True)
             for row in range(len(items) * num_samples)]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(items))]


def evaluate(model, tokenizer, items, dataset="data", num_samples=5, temperature=0.6, top_p=0.95, top_k=0,
             max_new_tokens=8192, batch_size=16, seed=0, done=(), on_records=None, progress=True):
    """Answer and score `items`; returns one record per sample:
    {key, dataset, index, sample, type, kind, variant, answer, response, correct}.

    model: a Transformer (with its Tokenizer) or the string "oracle". temperature 0 is greedy
    decoding (then num_samples is 1). Items whose key is in `done` are skipped; `on_records` is
    called with each finished batch's records (eval.py appends them to responses.jsonl)."""
    if temperature == 0:
        num_samples = 1
    todo = [(i, item) for i, item in enumerate(items) if item_key(dataset, i, item) not in done]
    if model != "oracle":
        # Similar lengths side by side: less padding in each batch.
        todo.sort(key=lambda pair: len(json.dumps(pair[1]["prompt"])))
    records = []
    bar = tqdm(total=len(todo), desc=f"eval {dataset}", unit="problem", disable=not progress, leave=False)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        responses = answer(model, tokenizer, [item for _, item in batch], num_samples, temperature, top_p, top_k,
                           max_new_tokens, seed + start)
        new = []
        for (index, item), samples in zip(batch, responses):
            for sample, response in enumerate(samples):
                new.append({"key": item_key(dataset, index, item), "dataset": dataset, "index": index,
                            "sample": sample, "type": item.get("type"), "kind": item.get("kind"),
                            "variant": item.get("variant"), "answer": item["answer"], "response": response,
                            "correct": is_correct(response, item["answer"])})
        records += new
        if on_records is not None:
            on_records(new)
        bar.update(len(batch))
    bar.close()
    return records


def accuracy(records, by="type"):
    """{group: accuracy} over samples, plus "overall"; group is the record's `by` field."""
    correct, total = defaultdict(int), defaultdict(int)
    for r in records:
        for group in (r.get(by), "overall"):
            correct[group] += bool(r["correct"])
            total[group] += 1
    return {group: correct[group] / total[group] for group in total}

# -----------------------------------------------------------------------------
# Files and the table


def read_responses(path):
    """The records of an earlier (possibly interrupted) run; a half-written last line is ignored."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # the run was killed mid-write; that problem is answered again
    return records


def format_table(columns, rows=scm.TASKS + ("overall",)):
    """columns: {name: {row: accuracy}} -> a Markdown table in percent ("-" where absent)."""
    names = list(columns)
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = [f"{100 * columns[n][row]:.1f}" if row in columns[n] else "-" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rescore(path):
    """Re-score saved responses with the official rule; prints and returns the table's columns."""
    records = read_responses(path)
    if not records:
        raise ValueError(f"{path}: no responses")
    for line, r in enumerate(records, start=1):
        for field in ("response", "answer"):
            if not isinstance(r.get(field), str):
                raise ValueError(f"{path}:{line}: field '{field}' must be a string")
        r["correct"] = is_correct(r["response"], r["answer"])
    columns = {name: accuracy([r for r in records if r.get("dataset", "data") == name])
               for name in dict.fromkeys(r.get("dataset", "data") for r in records)}
    print(format_table(columns))
    return records, columns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    parser.add_argument("--model", default=None,
                        help="a Hugging Face folder, a hub id, or 'oracle' (answers with nanocausal.scm.solve)")
    parser.add_argument("--rescore", default=None,
                        help="instead of sampling, score the responses of a responses.jsonl file (fields response, "
                             "answer, type, dataset; e.g. written by another engine) with the official rule")
    parser.add_argument("--data", nargs="+", default=None,
                        help="CauGym-format .json/.jsonl files (e.g. ../shared/data/caugym/base.json), or generated "
                             "sets: gen:VARIANT:N (nanocausal.scm.generate), tiny:N, tiny-rephrased:N (tiny curriculum)")
    parser.add_argument("--per-task", type=int, default=None, help="keep only the first N problems of each task per data set")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N problems of each data set")
    parser.add_argument("--tasks", nargs="+", default=list(scm.TASKS), choices=scm.TASKS,
                        help="tasks of the generated sets (gen:...)")
    parser.add_argument("--nodes", type=int, default=None, help="graph size of the generated sets (default: the variant's)")
    # the protocol (official defaults)
    parser.add_argument("--num-samples", type=int, default=OFFICIAL["num_samples"], help="samples per problem (official: 5)")
    parser.add_argument("--temperature", type=float, default=OFFICIAL["temperature"],
                        help="sampling temperature (official: 0.6; 0 = greedy, one sample)")
    parser.add_argument("--top-p", type=float, default=OFFICIAL["top_p"], help="nucleus sampling mass (official: 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off, as official)")
    parser.add_argument("--max-new-tokens", type=int, default=OFFICIAL["max_new_tokens"],
                        help="longest reply in tokens (official: 8192; lower it on a CPU and say so)")
    # running
    parser.add_argument("--batch-size", type=int, default=16, help="problems per sampler call (x num-samples rows)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and generation seed of gen:/tiny: sets)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--out", default="runs/eval", help="folder for responses.jsonl and summary.json")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    if args.model is None or args.data is None:
        parser.error("--model and --data are required (unless --rescore)")

    datasets = []
    for spec in args.data:
        name, items = load_dataset(spec, seed=args.seed, tasks=tuple(args.tasks), nodes=args.nodes)
        if args.per_task is not None:
            items = per_task_slice(items, args.per_task)
        datasets.append((name, items[:args.limit]))

    if args.model == "oracle":
        model, tokenizer = "oracle", None
    else:
        from nanocausal.model import Transformer
        from nanocausal.tokenizer import Tokenizer
        from nanocausal.training import default_device
        device = args.device or default_device()
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if "cuda" in str(device) else torch.float32)
        tokenizer = Tokenizer.from_pretrained(args.model)
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)

    os.makedirs(args.out, exist_ok=True)
    responses_path = os.path.join(args.out, "responses.jsonl")
    previous = read_responses(responses_path)
    samples_per_key = defaultdict(int)
    for r in previous:
        samples_per_key[r["key"]] += 1
    expected = 1 if args.temperature == 0 else args.num_samples
    done = {key for key, n in samples_per_key.items() if n >= expected}
    previous = [r for r in previous if r["key"] in done]  # a partly answered problem is redone whole
    with open(responses_path, "w") as f:  # rewrite without the partial ones, then append
        f.writelines(json.dumps(r) + "\n" for r in previous)
    if done:
        print(f"resuming: {len(done)} problems already answered in {responses_path}")

    started = time.time()
    columns = {}
    with open(responses_path, "a") as f:
        def append(records):
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
        for name, items in datasets:
            records = evaluate(model, tokenizer, items, dataset=name, num_samples=args.num_samples,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                               done=done, on_records=append)
            keys = {item_key(name, i, item) for i, item in enumerate(items)}
            records += [r for r in previous if r["key"] in keys]
            columns[name] = accuracy(records)
            columns[name]["_samples"] = len(records)

    print(format_table(columns))
    summary = {"model": args.model, "protocol": {"num_samples": expected, "temperature": args.temperature,
                                                 "top_p": args.top_p, "top_k": args.top_k,
                                                 "max_new_tokens": args.max_new_tokens},
               "accuracy": columns, "seconds": round(time.time() - started, 1)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"responses: {responses_path}\nsummary: {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
