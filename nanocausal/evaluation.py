"""The CauGym evaluation protocol, run on a model: what eval.py, the trainers' periodic evaluation
and pipeline.py all call.

The protocol itself (the user message, the sampling settings, the scoring rule) is fixed in
nanocausal.caugym; this module loads the problems, answers them through the sampler (or the
symbolic `oracle`), scores every sample and aggregates accuracy = correct samples / all samples,
per task and overall (`run` is eval.py's job).

CaLM-Lite task files (or folders of them) run through the same path with CaLM's own prompts and
labelling (nanocausal.calm); their table has a row per task, per rung of the causal ladder and
overall. Two pseudo-models check the pipeline without a network (`pseudo_reply`): `oracle` (the
symbolic solver) and `gold` (each item's gold answer).
"""
import glob
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import MISSING, dataclass

import torch
from tqdm import tqdm

from nanocausal import calm, caugym, checkpoint, cli, data, distributed, memory_plan, problems, rundir, tiny
from nanocausal.cli import setting
from nanocausal.pass_at_k import pass_and_majority
from nanocausal.problem_text import solve
from nanocausal.generate import generate_many
from nanocausal.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- problems


PSEUDO_MODELS = ("oracle", "gold")


def load_dataset(spec, seed=0, tasks=caugym.TASKS, nodes=None, prompt_style="basic"):
    """One --data entry -> (name, items); an item is {prompt (messages), problem, answer, type, variant}.

    spec is a CauGym-format .json / .jsonl file (problem, answer, Type; or prompt, answer, type),
    "gen:VARIANT:N" (N problems from nanocausal.problems.generate), "tiny:N" / "tiny-VARIANT:N"
    (the tiny curriculum, tiny.VARIANTS), or a CaLM task file or folder of them (calm.load_dataset, prompted in
    CaLM's `prompt_style`)."""
    if os.path.isdir(spec) or calm.is_task_file(spec):
        return calm.load_dataset(spec, prompt_style)
    if spec.startswith("tiny") and not os.path.exists(spec):  # (a file named tiny... is a file)
        name, _, n = spec.partition(":")
        variant = name[len("tiny-"):] if name.startswith("tiny-") else "base"
        if name not in ("tiny", "tiny-" + variant) or variant not in tiny.VARIANTS or not _count_ok(n):
            raise ValueError(f"--data {spec}: expected tiny:N or tiny-VARIANT:N with VARIANT one of "
                             f"{', '.join(tiny.VARIANTS[1:])} and N in 1..{MAX_GENERATED:,}")
        items = tiny.make_problems(int(n), seed=seed, variant=variant)
    elif spec.startswith("gen:"):
        parts = spec.split(":")
        if len(parts) != 3 or parts[1] not in caugym.VARIANTS or not _count_ok(parts[2]):
            raise ValueError(f"--data {spec}: expected gen:VARIANT:N with VARIANT one of {', '.join(caugym.VARIANTS)} "
                             f"and N in 1..{MAX_GENERATED:,}")
        variant = parts[1]
        items = problems.generate(int(parts[2]), tasks=tasks, variant=variant, nodes=nodes, seed=seed)
    else:
        return os.path.splitext(os.path.basename(spec))[0], data.load_examples(spec, "rl")
    return spec, [dict(item, prompt=[{"role": "user", "content": caugym.official_prompt(item["problem"], variant)}])
                  for item in items]


MAX_GENERATED = 1_000_000  # problems of one generated set (the CauGym test sets have 700)


def _count_ok(text):
    return text.isdigit() and 1 <= int(text) <= MAX_GENERATED


def per_task_slice(items, per_task):
    """The first `per_task` items of each Type (of a CaLM item: its task), in file order."""
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

# ----------------------------------------------------------------------------- answering and scoring


def sample_key(key):
    """The integer that keys a problem's random numbers: a hash of its item_key, so its sampled
    replies depend on the run seed and the problem only, never on the batch, the slot it decodes
    in, the order of the data sets or how many processes share them."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)


def pseudo_reply(model, item):
    """oracle: the symbolic solver's answer (None, no answer, for a CaLM item that is no CauGym-style
    problem); gold: the gold answer, as CaLM's prompt asks for it or CauGym's answer JSON."""
    if model == "gold":
        return calm.gold_reply(item["calm"], item["type"]) if "calm" in item else item["answer"]
    if "calm" in item and "problem" not in item:
        return None
    return solve(item.get("problem") or item["prompt"][-1]["content"])


def scoring(item, response):
    """A record's scoring fields: `correct` by CauGym's official rule, or for a CaLM item its rung,
    style, CaLM's label and score (calm.label_and_score; correct None: not scored or no reply)."""
    if "calm" in item:
        label, correct = calm.label_and_score(response, item["calm"], item["type"], item["style"])
        return {"rung": item["rung"], "style": item["style"], "label": label, "correct": correct}
    return {"correct": caugym.is_correct(response, item["answer"])}


def evaluate(model, tokenizer, items, dataset="data", num_samples=5, temperature=0.6, top_p=0.95, top_k=0,
             max_new_tokens=8192, batch_size=16, seed=0, done=(), on_records=None, progress=True, rank=0, world_size=1,
             compile_decode=False):
    """Answer and score `items`; returns one record per sample, in item order:
    {key, dataset, index, sample, type, kind, variant, answer, response, correct} (CaLM items also
    rung, style and label).

    model: a Transformer (with its Tokenizer) or "oracle" / "gold". temperature 0 is greedy
    decoding (then num_samples is 1). Replies are decoded by continuous batching over batch_size *
    num_samples rows (generate.generate_many), each capped at what the model's context leaves after
    its prompt (the official 8192 new tokens do not fit every model: SmolLM2's context is 8192 in
    all), as a serving engine does. Items whose key is in `done` are skipped; `on_records` is
    called with each problem's records as soon as it is answered (run() appends them to
    responses.jsonl). With world_size > 1 only every world_size-th problem still to answer, from
    the rank-th, is answered here."""
    if temperature == 0:
        num_samples = 1
    todo = [(i, item) for i, item in enumerate(items) if item_key(dataset, i, item) not in done][rank::world_size]
    records = {}
    bar = tqdm(total=len(todo), desc=f"eval {dataset}", unit="problem", disable=not progress, leave=False)

    def answered(j, responses):
        index, item = todo[j]
        new = [{"key": item_key(dataset, index, item), "dataset": dataset, "index": index, "sample": sample,
                "type": item.get("type"), "kind": item.get("kind"), "variant": item.get("variant"),
                "answer": item["answer"], "response": response, **scoring(item, response)}
               for sample, response in enumerate(responses)]
        records[index] = new
        if on_records is not None:
            on_records(new)
        bar.update(1)
    if model in PSEUDO_MODELS:
        for j, (_, item) in enumerate(todo):
            answered(j, [pseudo_reply(model, item)] * num_samples)
    elif todo:
        prompts = [tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True) for _, item in todo]
        generate_many(model, prompts, max_new_tokens, slots=batch_size * num_samples, temperature=temperature,
                      top_p=top_p, top_k=top_k, num_samples=num_samples, eos_token_ids=tokenizer.eos_token_ids,
                      seed=seed, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                      prompt_keys=[sample_key(item_key(dataset, i, item)) for i, item in todo],
                      compile_decode=compile_decode, on_prompt_done=lambda j, completions: answered(
                          j, [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]))
    bar.close()
    return [record for index in sorted(records) for record in records[index]]


def accuracy(records, by="type"):
    """{group: accuracy} over samples, plus "overall"; group is the record's `by` field. Samples with
    `correct` None (not scored) are left out."""
    scores = defaultdict(list)  # group -> the correctness of each of its scored samples
    for r in records:
        if r["correct"] is not None:
            for group in (r.get(by), "overall"):
                scores[group].append(bool(r["correct"]))
    return {group: sum(values) / len(values) for group, values in scores.items()}


# ----------------------------------------------------------------------------- files and the table


def read_responses(path):
    """The records of an earlier (possibly interrupted) run. A line that is not valid JSON (the
    last line of a killed run, or a damaged one) is reported and skipped, never a reason to drop
    the lines after it; a (problem, sample) answered twice keeps its last answer."""
    records = {}
    if os.path.exists(path):
        with open(path, "rb") as f:  # decoded line by line: one damaged line never hides the others
            for line_number, line in enumerate(f, start=1):
                try:
                    record = json.loads(line.decode("utf-8"))
                    records[(record["key"], record["sample"])] = record
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
                    if line.strip():
                        print(f"{path}:{line_number}: not a response record, skipped (that problem is answered again)")
    return list(records.values())


def format_table(columns, rows=caugym.TASKS + ("overall",)):
    """columns: {name: {row: accuracy}} -> a Markdown table in percent ("-" where absent)."""
    names = list(columns)
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = [f"{100 * columns[n][row]:.1f}" if row in columns[n] else "-" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rescore(path):
    """Re-score saved responses with the official rule; prints the table, returns (records, columns)."""
    records = read_responses(path)
    if not records:
        raise ValueError(f"{path}: no responses")
    for r in records:  # named by key and sample: duplicates and damaged lines were dropped, so no line number
        where = f"{path}: the response to problem {r['key']!r}, sample {r['sample']!r}"
        if "rung" in r:
            raise ValueError(f"{where} is a CaLM response; --rescore scores CauGym responses only")
        for field in ("response", "answer"):
            if not isinstance(r.get(field), str):
                raise ValueError(f"{where}: field '{field}' must be a string")
        r["correct"] = caugym.is_correct(r["response"], r["answer"])
    columns = {name: accuracy([r for r in records if r.get("dataset", "data") == name])
               for name in dict.fromkeys(r.get("dataset", "data") for r in records)}
    print(format_table(columns))
    return records, columns

# ----------------------------------------------------------------------------- eval.py


@dataclass
class EvalConfig:
    """eval.py's settings, each a flag of it (cli.setting)."""
    model: str = setting(MISSING, "a Hugging Face folder, a hub id, 'oracle' (answers with the symbolic solver) or "
                         "'gold' (answers every item with its gold answer: a check of prompts, files and scoring)",
                         group="what to evaluate")
    data: list = setting(MISSING, "CauGym-format .json/.jsonl files (e.g. ../shared/data/caugym/base.json), generated "
                         "sets: gen:VARIANT:N (nanocausal.problems.generate), tiny:N or tiny-VARIANT:N (the tiny "
                         "curriculum: tiny-omitted:100, ...), or CaLM task files or folders of them (e.g. "
                         "../shared/data/calm_lite)")
    per_task: int | None = setting(None, "keep only the first N problems of each task per data set",
                                   type=cli.positive_int)
    prompt_style: str = setting("basic", "CaLM prompt style of CaLM tasks (CaLM-Lite's: basic)", choices=calm.STYLES)
    limit: int | None = setting(None, "keep only the first N problems of each data set", type=cli.positive_int)
    tasks: tuple = setting(caugym.TASKS, "comma-separated tasks of the generated sets (gen:...)", type=cli.task_list)
    nodes: int | None = setting(None, "graph size of the generated sets (default: the variant's)", type=cli.graph_size)
    num_samples: int = setting(caugym.OFFICIAL_SAMPLING["num_samples"], "samples per problem (official: 5)",
                               type=cli.positive_int, group="the protocol (official defaults)")
    temperature: float = setting(caugym.OFFICIAL_SAMPLING["temperature"], "sampling temperature (official: 0.6; 0 = "
                                 "greedy, one sample)", type=cli.non_negative_float)
    top_p: float = setting(caugym.OFFICIAL_SAMPLING["top_p"], "nucleus sampling mass (official: 0.95)", type=cli.top_p)
    top_k: int = setting(0, "keep only the k most likely tokens (0 = off, as official)", type=cli.non_negative_int)
    max_new_tokens: int = setting(caugym.OFFICIAL_SAMPLING["max_new_tokens"], "longest reply in tokens (official: "
                                  "8192; lower it on a CPU and say so)", type=cli.positive_int)
    batch_size: int = setting(16, "problems decoded at once by continuous batching: batch-size * num-samples rows, a "
                              "finished row taking the next waiting problem", type=cli.positive_int, group="running")
    seed: int = setting(0, "sampling seed (and generation seed of gen:/tiny: sets)", type=cli.seed)
    compile_decode: bool = setting(False, "torch.compile the decode step before the CUDA graphs "
                                   "capture it (gpt-fast's route: fewer, fused kernels per token; one compilation per "
                                   "process, minutes on first use)")
    dtype: str | None = setting(None, "model weights dtype (default: bfloat16 on GPU, float32 on CPU)",
                                choices=("float32", "bfloat16", "float16"))
    device: str | None = setting(None, "cuda, cpu, mps (default: the best available)", type=cli.device)
    out: str = setting("runs/eval", "folder for responses.jsonl and summary.json")

    def __post_init__(self):  # a library user's config is refused as eval.py's flags would be
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("--model must be a Hugging Face folder, a hub id, 'oracle' or 'gold'")
        if isinstance(self.data, str) or not self.data or not all(isinstance(d, str) for d in self.data):
            raise ValueError("--data must be a list of data set names (files, folders, gen:VARIANT:N, tiny:N)")
        cli.check_config(self)


def check_prompts_fit(tokenizer, context, datasets):
    """Every prompt renders with the model's chat template and leaves room for a reply in its
    context; else a ValueError naming the item (its file and line, or its --data entry and index).
    A too-long prompt is refused before the run, not skipped: accuracy over a silently smaller set
    would not be the protocol's number (lower --limit or --per-task, or drop the item)."""
    for _, spec, items in datasets:
        for i, item in enumerate(items):
            where = item.get("_where") or f"--data {spec}: item {i}"
            try:
                length = len(tokenizer.apply_chat_template(item["prompt"], add_generation_prompt=True))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if length >= context:
                raise ValueError(f"{where}: the prompt is {length} tokens, the model's whole context is {context}: "
                                 f"no room for a reply")


def run_settings(config: EvalConfig):
    """What makes two runs' responses interchangeable: the model, the data, the protocol. The model
    is compared by content (checkpoint.fingerprint: the SHA-256s of its config and weights, an
    adapter's base included; a pseudo-model by its name), not by its path: a folder whose weights
    were replaced is another model, and a folder moved elsewhere is the same one. Hashing reads
    the weights once (about 1.4 GB/s on one core: 11 s for a 7B model in bf16)."""
    identity = config.model if config.model in PSEUDO_MODELS else checkpoint.fingerprint(config.model)
    return {"model": config.model, "model_fingerprint": identity, "data": list(config.data),
            "per_task": config.per_task, "limit": config.limit, "tasks": list(config.tasks), "nodes": config.nodes,
            "seed": config.seed, "num_samples": 1 if config.temperature == 0 else config.num_samples,
            "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
            "max_new_tokens": config.max_new_tokens,
            **({"prompt_style": config.prompt_style} if config.prompt_style != "basic" else {})}


def fold_rank_files(responses_path):
    """Append the records of every rank's responses-rankR.jsonl (a torchrun run) to responses.jsonl
    and remove those files."""
    for path in sorted(glob.glob(responses_path.replace(".jsonl", "-rank*.jsonl"))):
        records = read_responses(path)
        with open_to_append(responses_path) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.remove(path)


def open_to_append(path):
    """The file opened for appending, on a line of its own (a killed run may have left a cut last line)."""
    f = open(path, "a+")
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def check_same_run(config: EvalConfig, settings):
    """Refuse to resume into responses made with other settings (`settings`: run_settings, which
    run() then records in <out>/run.json)."""
    path = os.path.join(config.out, "run.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(config.out, "responses.jsonl")):
        saved = checkpoint.read_json(path)
        # by content when run.json recorded it (the path may differ: a moved folder), else by path
        by = "model_fingerprint" if "model_fingerprint" in saved else "model"
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if k not in ("model", "model_fingerprint") and saved.get(k) != v]
        if saved.get(by) != settings[by]:
            changed.insert(0, f"model {saved.get('model')!r} -> {config.model!r}" if saved.get("model") != config.model
                           else f"model {config.model}: its files changed since those responses")
        if changed:
            raise ValueError(f"{config.out} holds responses of another run ({', '.join(changed)}): "
                             f"choose another --out, or delete {config.out}")


def run(config: EvalConfig):
    """Evaluate config.model on every data set; print the table, write responses.jsonl and
    summary.json under config.out (resuming from an earlier responses.jsonl); return the summary.

    Under torchrun each rank holds the whole model and answers every N-th problem still to answer
    (its replies do not depend on which rank answers: sample_key); it appends them to its own
    responses-rankR.jsonl, which rank 0 folds into responses.jsonl at the end (and at the start
    of a resumed run, after a kill). Rank 0 alone prints and writes summary.json."""
    if config.device is not None and config.model not in PSEUDO_MODELS:
        if problem := memory_plan.device_problem(config.device):
            raise ValueError(problem)
    config.device = distributed.setup(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, ranks = distributed.rank(), distributed.world_size()
    datasets = []
    for spec in config.data:
        name, items = load_dataset(spec, seed=config.seed, tasks=tuple(config.tasks), nodes=config.nodes,
                                   prompt_style=config.prompt_style)
        if config.per_task is not None:
            items = per_task_slice(items, config.per_task)
        datasets.append((name, spec, items[:config.limit]))
    if config.model not in PSEUDO_MODELS:  # everything checked before anything is written
        check_prompts_fit(Tokenizer.from_pretrained(config.model),
                          memory_plan.meta_model(config.model).config.max_position_embeddings, datasets)
    responses_path = os.path.join(config.out, "responses.jsonl")
    settings = run_settings(config) if distributed.is_main() else None
    if distributed.is_main() and os.path.isdir(config.out):
        rundir.lock(config.out)  # one eval.py writes an --out at a time, for its whole run
        check_same_run(config, settings)  # a refusal comes before the model loads
    model, tokenizer = config.model, None
    if config.model not in PSEUDO_MODELS:  # (a broken model fails before anything is written)
        dtype = getattr(torch, config.dtype or ("bfloat16" if "cuda" in config.device else "float32"))
        model = checkpoint.load_model(config.model, dtype=dtype, device=config.device)
        tokenizer = Tokenizer.from_pretrained(config.model)
    if distributed.is_main():
        rundir.lock(config.out)  # (creates it; a no-op when held already)
        check_same_run(config, settings)
        with open(os.path.join(config.out, "run.json"), "w") as f:
            json.dump(settings, f, indent=2)
        fold_rank_files(responses_path)
    distributed.barrier()
    expected = 1 if config.temperature == 0 else config.num_samples
    previous = read_responses(responses_path)
    done = {key for key, n in Counter(r["key"] for r in previous).items() if n >= expected}
    previous = [r for r in previous if r["key"] in done]  # a partly answered problem is answered again, whole
    if done and distributed.is_main():
        print(f"resuming: {len(done)} problems already answered in {responses_path}")

    started = time.time()
    columns, sampled = {}, {}
    own_path = responses_path if ranks == 1 else responses_path.replace(".jsonl", f"-rank{rank}.jsonl")
    with open_to_append(own_path) as f:  # appended to, never rewritten: nothing answered is ever lost

        def append(records):
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
        for name, _, items in datasets:
            records = evaluate(model, tokenizer, items, dataset=name, num_samples=config.num_samples,
                               temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                               max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                               seed=config.seed, done=done, on_records=append, progress=distributed.is_main(),
                               compile_decode=config.compile_decode,
                               rank=rank, world_size=ranks)
            records = sorted((r for part in distributed.all_objects(records) for r in part),
                             key=lambda r: (r["index"], r["sample"]))
            keys = {item_key(name, i, item) for i, item in enumerate(items)}
            records += [r for r in previous if r["key"] in keys]
            columns[name] = accuracy(records)
            if any("calm" in item for item in items):  # CaLM: per task (above), per rung and the tasks run
                columns[name].update(accuracy(records, by="rung"))
                columns[name]["_tasks"] = sorted({item["type"] for item in items})
            columns[name]["_samples"] = len(records)
            if expected > 1 and "_tasks" not in columns[name]:  # several samples: coverage vs sharpness
                sampled[name] = pass_and_majority(records, expected)

    distributed.barrier()  # every rank's file is complete
    if not distributed.is_main():
        return None
    fold_rank_files(responses_path)
    caugym_columns = {name: column for name, column in columns.items() if "_tasks" not in column}
    calm_columns = {name: column for name, column in columns.items() if "_tasks" in column}
    if caugym_columns:
        print(format_table(caugym_columns))
    if calm_columns:
        print(calm.format_table(calm_columns))
    for name, table in sampled.items():  # pass@1 is the accuracy above, per problem
        print(f"\n{name}, {expected} samples per problem:")
        print(format_table({metric: {group: table[group][metric] for group in table} for metric in table["overall"]},
                           rows=[task for task in caugym.TASKS if task in table] + ["overall"]))
    protocol = {k: settings[k] for k in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens")}
    summary = {"model": config.model, "protocol": protocol, "accuracy": columns,
               "seconds": round(time.time() - started, 1)}
    if sampled:
        summary["pass_and_majority"] = sampled
    if calm_columns:
        summary["protocol"]["prompt_style"] = config.prompt_style
        summary["random_guess"] = {task: calm.TASKS[task][3] for column in calm_columns.values()
                                   for task in column["_tasks"]}
    with open(os.path.join(config.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"responses: {responses_path}\nsummary: {os.path.join(config.out, 'summary.json')}")
    return summary
