"""The "tiny" preset: a causal-reasoning task, tokenizer and model small enough to post-train on
a laptop CPU in minutes, saved as an ordinary Hugging Face folder so that every script runs it
through exactly the code path of a real checkpoint (config.json + model.safetensors +
tokenizer.json + a ChatML chat template).

The curriculum. Real CauGym problems (../shared/docs/causal_tasks.md) ask seven questions about
3-10 node graphs. A sub-million-parameter model cannot learn that in minutes, so the tiny
curriculum keeps one question, the average treatment effect (ATE), on 3-node graphs, in the
official base wording, with two kinds of item:

- "effect": X causes Y and no adjustment is needed, so the problem shows P(y|x) and P(y|x') (in
  that order: easy_order; official problems use either order) and
      ATE = P(y|x) - P(y|x')
  a subtraction of two shown 4-decimal numbers;
- "no path": there is no directed path X -> ... -> Y, the problem shows no numbers, and the
  answer is {"ANSWER": "No", "PROB": "0.0000"}.

The problems are genuine CauGym problems: nanocausal.scm.solve parses them and returns the same
answer (tests/test_tiny.py checks it), and eval.py scores them with the official rule.

The worked solution. A small transformer does not learn to state a 4-digit difference in one
go (issue 7: 7 minutes of SFT never got one exactly right), but it does learn the school method,
one column at a time from the right, each column written as "top - borrow - bottom = digit",
with the top digit already raised by 10 when the column borrows:

    path: yes
    ATE = 0.8445 - 0.9288 = -(0.9288 - 0.8445)
    8-0-5=3 8-0-4=4 12-0-4=8 9-1-8=0
    = -0.0843
    {"ANSWER": "No", "PROB": "-0.0843"}

(columns right to left: 8-5=3; 8-4=4; 2<4 so 12-4=8, borrowing; 9-1-8=0.) Every digit of the
answer is then produced by a one-digit operation whose inputs sit a few tokens back.

A careless teacher (solution(item, slip_rate, rng)) forgets each borrow it owes with probability
slip_rate, writing "9-0-8=1" for "9-1-8=0", and carries the wrong result into its final answer:
demonstrations with the kind of systematic mistake SFT imitates and an outcome reward does not.

The tokenizer is a byte-level BPE trained with `tokenizers` on generated problems and
solutions. It uses Qwen2's pre-tokenizer, so digits are one per token (the column arithmetic needs to see
single digits) and transformers' Qwen2Tokenizer reads the folder as nanocausal does; with ~1000
merges every word of the CauGym template is a single token.
"""
import json
import os
import random

TINY_NAMES = ["smku", "eons", "arbu", "pgqh", "ahpi", "lsrx", "imah", "ojko", "wexo", "qlun",
              "dovr", "fibe", "tazu", "kryp", "mulo", "gesh", "vunt", "yelb", "niqo", "hast"]
PREAMBLE = ("Input Info: Imagine a self-contained, hypothetical world with only the following conditions, "
            "and without any unmentioned factors or causal relationships: ")
PROVIDE = ('Provide the calculation result to four decimal places and a final "yes" or "no" answer in JSON '
           'format, like {"ANSWER": "Yes", "PROB": "0.1234"}:')
# Held-out wording (the "rephrased" variant of the go-beyond experiment): same problems, other words.
PREAMBLE_REPHRASED = ("Input Info: Consider an isolated, imaginary world where only these conditions hold, "
                      "with no other factors or causal links: ")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
KINDS = ("effect", "no path")
# The shipped preset: 4 layers of width 96, 4 query / 2 key-value heads (~0.45M parameters).
TINY_MODEL = dict(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=288)

# ----------------------------------------------------------------------------- problems


def _sentence_case(name):
    return name[0].upper() + name[1:]


def make_problem(rng, no_path_share=0.375, rephrased=False, easy_order=True):
    """One tiny-curriculum item: dict(problem, answer, kind, numbers=(p_x, p_x') or None)."""
    names = rng.sample(TINY_NAMES, 3)
    while True:  # a random DAG over 3 nodes in topological order; every node on some edge (as CauGym)
        edges = [(i, j) for i in range(3) for j in range(i + 1, 3) if rng.random() < 0.6]
        if {v for e in edges for v in e} == {0, 1, 2}:
            break
    children = {i: [j for a, j in edges if a == i] for i in range(3)}

    def reaches(a, b):
        return a == b or any(reaches(c, b) for c in children[a])
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    want_path = rng.random() >= no_path_share
    # An effect needs a directed path and no confounder (no third node W with W -> X and W -> Y),
    # so that the empty set is a valid adjustment set and ATE = P(y|x) - P(y|x').
    ok = [(a, b) for a, b in pairs if reaches(a, b) == want_path
          and not any((w, a) in edges and (w, b) in edges for w in range(3))]
    if not ok:
        return make_problem(rng, no_path_share, rephrased, easy_order)
    x, y = rng.choice(ok)
    x_value, y_value = rng.choice(["low", "high"]), rng.choice(["low", "high"])
    other = "high" if x_value == "low" else "low"
    edge_text = " ".join(f"{_sentence_case(names[a])} has a direct effect on {names[b]}." for a, b in edges)
    if want_path:
        p_x, p_other = rng.randint(1, 9999) / 10000, rng.randint(1, 9999) / 10000
        # Easy curriculum: the statement for the value X is changed to comes first, so the ATE is
        # "first number - second number" (official problems list them in either order).
        shown = [(x_value, p_x), (other, p_other)]
        if not easy_order:
            rng.shuffle(shown)
        stats = " ".join(f"For those with {names[x]} being {v}, the probability of {names[y]} being {y_value} "
                         f"is {p:.4f}." for v, p in shown) + " "
        value = round(p_x - p_other, 4)
        answer = {"ANSWER": "Yes" if value >= 0.001 else "No", "PROB": f"{value + 0.0:.4f}"}
        numbers = (p_x, p_other)
    else:
        stats, numbers = "", None
        answer = {"ANSWER": "No", "PROB": "0.0000"}
    preamble = PREAMBLE_REPHRASED if rephrased else PREAMBLE
    question = (f"Would setting {names[x]} to {x_value} make {names[y]} more likely to be {y_value}?" if rephrased
                else f"If {names[x]} is changed to be {x_value}, will {names[y]} be more likely to be {y_value}?")
    problem = (f"{preamble}{edge_text}\n{stats}\n"
               f"Instruction: Consider the average treatment effect (ATE) of {names[x]} on {names[y]}.\n"
               f"Question: {question}\n{PROVIDE}")
    return {"problem": problem, "answer": json.dumps(answer), "type": "ATE",
            "kind": "effect" if want_path else "no path", "variant": "rephrased" if rephrased else "base",
            "numbers": numbers}


def make_problems(n, seed, no_path_share=0.375, rephrased=False, easy_order=True):
    rng = random.Random(seed)
    return [make_problem(rng, no_path_share, rephrased, easy_order) for _ in range(n)]


def subtraction_columns(top, bottom, forget_borrow=lambda: False):
    """Column-by-column subtraction of two 4-decimal numbers in [0, 1) with top >= bottom, right to
    left: ["18-0-5=3", ...] (top digit raised by 10 when the column borrows) and the result digits.

    forget_borrow() is asked at every column that owes a borrow; when it says True the column
    forgets it ("9-0-8=1" instead of "9-1-8=0"), the classic slip of a careless teacher."""
    top_digits, bottom_digits = f"{top:.4f}"[2:], f"{bottom:.4f}"[2:]
    columns, result, borrow = [], [], 0
    for t, b in zip(map(int, reversed(top_digits)), map(int, reversed(bottom_digits))):
        if borrow and forget_borrow():
            borrow = 0
        borrow_out = int(t - borrow < b)
        digit = t + 10 * borrow_out - borrow - b
        columns.append(f"{t + 10 * borrow_out}-{borrow}-{b}={digit}")
        result.append(str(digit))
        borrow = borrow_out
    assert borrow == 0, "top must be >= bottom"
    return columns, "0." + "".join(reversed(result))


def solution(item, slip_rate=0.0, rng=None):
    """The worked solution of a tiny-curriculum item (see the module docstring for the format).

    slip_rate > 0 writes it as a careless teacher would: each borrow owed is forgotten with this
    probability (drawn from rng), and the wrong result is carried to the final answer."""
    answer = json.loads(item["answer"])
    if item["numbers"] is None:
        return "path: no\n" + json.dumps(answer)
    forget_borrow = (lambda: rng.random() < slip_rate) if slip_rate > 0 else (lambda: False)
    p_x, p_other = item["numbers"]
    if p_x >= p_other:
        head = f"ATE = {p_x:.4f} - {p_other:.4f}"
        columns, magnitude = subtraction_columns(p_x, p_other, forget_borrow)
        result = magnitude
    else:
        head = f"ATE = {p_x:.4f} - {p_other:.4f} = -({p_other:.4f} - {p_x:.4f})"
        columns, magnitude = subtraction_columns(p_other, p_x, forget_borrow)
        result = "-" + magnitude if magnitude != "0.0000" else magnitude
    if slip_rate == 0:
        assert float(result) == float(answer["PROB"]), (result, answer)
    answer["PROB"] = result
    return f"path: yes\n{head}\n{' '.join(columns)}\n= {result}\n{json.dumps(answer)}"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

# ----------------------------------------------------------------------------- tokenizer + model


def train_tokenizer(out_dir, vocab_size=1000, n_texts=3000, seed=1234):
    """A byte-level BPE on generated problems + solutions, digits one per token, ChatML special
    tokens, saved as tokenizer.json + tokenizer_config.json (chat template, eos <|im_end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    # Qwen2's own pipeline (NFC, its split pattern, then bytes), so that transformers' Qwen2Tokenizer,
    # which rebuilds the pre-tokenizer from the model type, reads the folder exactly as we do. The
    # pattern isolates every digit (\p{N}): digits are one per token, as the column arithmetic needs.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    items = make_problems(n_texts, seed) + make_problems(n_texts // 4, seed + 1, rephrased=True)
    texts = [it["problem"] + "\nLet's think step by step." for it in items] + [solution(it) for it in items]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=48)
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 1024,
              "clean_up_tokenization_spaces": False, "chat_template": CHATML_TEMPLATE,
              "added_tokens_decoder": {str(tokenizer.token_to_id(t)): {
                  "content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                  "single_word": False} for t in SPECIAL_TOKENS}}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tokenizer


def tiny_config(vocab_size, eos_id, pad_id, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=384, max_positions=512):
    """A Qwen2 config.json (q/k/v bias, tied embeddings), as transformers writes it."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
            "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads, "head_dim": hidden_size // num_heads,
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": True, "use_sliding_window": False,
            "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "float32",
            "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id}


def build_tiny(out_dir, seed=0, vocab_size=1000, n_texts=3000, **model_kwargs):
    """Train the tokenizer and write a randomly initialised tiny Qwen2 as a Hugging Face folder."""
    import torch
    from nanocausal.model import ModelConfig, Transformer
    tokenizer = train_tokenizer(out_dir, vocab_size=vocab_size, n_texts=n_texts)
    eos_id, pad_id = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = tiny_config(tokenizer.get_vocab_size(), eos_id, pad_id, **model_kwargs)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos_id], "pad_token_id": pad_id}, f, indent=2)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(config))
    with torch.no_grad():  # GPT-2 style init: N(0, 0.02) weights, zero biases, unit norms
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    model.save_pretrained(out_dir)
    return out_dir

# ----------------------------------------------------------------------------- a pretrained base
# Post-training starts from a pretrained model that can already read and do arithmetic; what SFT
# and RL add is the causal task. A randomly initialised model spends its first thousands of steps
# learning to copy digits at all (measured: after 150 SFT steps it writes the same numbers for
# every problem), so the tiny pipeline starts from a "base" pretrained on generic skills only:
#   - problem texts (language modelling on the prompts; no solutions),
#   - copying: a problem followed by "Numbers: a b", its numbers in order of appearance,
#   - arithmetic: "a - b" written as in the solutions, on random pairs, with no problem around it.
# Which numbers the ATE needs, in which order, when there is no path, and the answer JSON are left
# to post-training. The shipped data/tiny-base was built on the shared 2-core machine (load ~7) with
#   python -m nanocausal.tiny --out base1 --minutes 22                     (1150 steps)
#   python -m nanocausal.tiny --resume-from base1 --out data/tiny-base --minutes 12 --lr 2e-3 --seed 1
# (321 more steps); it then completes held-out column subtractions exactly 86 % of the time and
# copies a problem's two numbers exactly 64 % of the time (greedy; 50 items each). The first 1150
# steps alone gave 12 % and 2 %: the copying skill appears late and suddenly.


def pretraining_text(rng):
    """One pretraining document (plain text, no chat template), chosen among the three kinds."""
    kind = rng.random()
    if kind < 0.4:
        a, b = rng.randint(1, 9999) / 10000, rng.randint(1, 9999) / 10000
        top, bottom = max(a, b), min(a, b)
        columns, magnitude = subtraction_columns(top, bottom)
        head = f"{a:.4f} - {b:.4f}" + ("" if a >= b else f" = -({top:.4f} - {bottom:.4f})")
        result = magnitude if a >= b or magnitude == "0.0000" else "-" + magnitude
        return f"{head}\n{' '.join(columns)}\n= {result}"
    item = make_problem(rng, no_path_share=0.2, rephrased=rng.random() < 0.2, easy_order=False)
    if kind < 0.7 or item["numbers"] is None:
        return item["problem"]
    shown = [float(t) for t in item["problem"].split("is ")[1:] if t[:1].isdigit() for t in [t[:6]]]
    return item["problem"] + "\nNumbers: " + " ".join(f"{p:.4f}" for p in shown)


def pretrain(folder, out_dir, minutes, batch_size=32, lr=3e-3, seed=0, log_every=25):
    """Language-model the folder's model on pretraining_text for `minutes` of wall time (AdamW,
    warmup then cosine on the elapsed fraction of the budget) and save it to out_dir."""
    import math
    import shutil
    import time
    import torch
    import torch.nn.functional as F
    from nanocausal.model import Transformer
    from nanocausal.tokenizer import Tokenizer
    tokenizer, model = Tokenizer.from_pretrained(folder), Transformer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, started, step = random.Random(seed), time.time(), 0
    model.train()
    while (elapsed := time.time() - started) < 60 * minutes:
        docs = [tokenizer.encode(pretraining_text(rng)) + [tokenizer.eos_token_ids[0]] for _ in range(batch_size)]
        length = max(map(len, docs))
        ids = torch.tensor([d + [tokenizer.pad_token_id] * (length - len(d)) for d in docs])
        mask = torch.tensor([[1] * len(d) + [0] * (length - len(d)) for d in docs])[:, 1:]
        logits = model(ids[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / (60 * minutes))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0:
            print(f"pretrain step {step} {elapsed:.0f}s loss {loss.item():.4f}", flush=True)
    model.eval().save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(folder, name), out_dir)
    return step


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build the tiny base model shipped in data/tiny-base "
                                                 "(tokenizer, Qwen2 config, generic pretraining).")
    parser.add_argument("--out", default="data/tiny-base", help="output Hugging Face folder")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock pretraining budget")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the corpus")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine over --minutes)")
    parser.add_argument("--resume-from", default=None,
                        help="continue pretraining this folder instead of building a fresh model")
    args = parser.parse_args()
    import tempfile
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.resume_from is None:
            build_tiny(scratch, seed=args.seed, **TINY_MODEL)
        steps = pretrain(args.resume_from or scratch, args.out, args.minutes, lr=args.lr, seed=args.seed)
    print(f"{args.out}: {steps} pretraining steps in {args.minutes} minutes")
