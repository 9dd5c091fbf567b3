"""The tiny base model of the laptop pipeline (data/tiny-base), built from nothing: a byte-level BPE
tokenizer, a ~0.45M-parameter Qwen2 with a ChatML template, and a short generic pretraining.
`python build_tiny_base.py` runs it; the tests build smaller ones with the same functions.

The tokenizer is a byte-level BPE trained with `tokenizers` on generated problems and solutions
(Qwen2's pre-tokenizer: digits one per token); with ~1000 merges every word of the CauGym template
is a single token.

Post-training starts from a pretrained model that can already read and do arithmetic; what SFT
and RL add is the causal task. A randomly initialised model spends its first thousands of steps
learning to copy digits at all (measured: after 150 SFT steps it writes the same numbers for
every problem), so the tiny pipeline starts from a "base" pretrained on generic skills only:
  - problem texts (language modelling on the prompts; no solutions),
  - copying: a problem followed by "Numbers: a b", its numbers in order of appearance,
  - arithmetic: "a - b" written as in the solutions, on random pairs, with no problem around it.
Which numbers the ATE needs, in which order, when there is no path, and the answer JSON are left
to post-training. The shipped data/tiny-base was built on a 2-core CPU (34 minutes) by the two
commands of build_tiny_base.py. It then completes held-out column subtractions exactly 86 % of
the time and copies a problem's two numbers exactly 64 % of the time (greedy; 50 items each).
The first 1150 steps alone gave 12 % and 2 %: the copying skill appears late and suddenly.
"""
import json
import os
import random
import shutil

import torch
import torch.nn.functional as F
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as BPETokenizer
from tqdm import tqdm

from nanocausal import checkpoint, data, training
from nanocausal.caugym import official_prompt
from nanocausal.model import ModelConfig, Transformer
from nanocausal.tiny import difference, make_problem, make_problems, solution, subtraction_columns
from nanocausal.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


# ----------------------------------------------------------------------------- tokenizer and model


def train_tokenizer(out_dir, vocab_size=1000, n_texts=3000, seed=1234):
    """A byte-level BPE on generated problems + solutions, digits one per token, ChatML special
    tokens, saved as tokenizer.json + tokenizer_config.json (chat template, eos <|im_end|>)."""
    tokenizer = BPETokenizer(models.BPE())
    # Qwen2's own pipeline (NFC, its split pattern, then bytes), so that transformers' Qwen2Tokenizer,
    # which rebuilds the pre-tokenizer from the model type, reads the folder exactly as we do. The
    # pattern isolates every digit (\p{N}): digits are one per token, as the column arithmetic needs.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    items = make_problems(n_texts, seed) + make_problems(n_texts // 4, seed + 1, variant="rephrased")
    texts = [official_prompt(it["problem"]) for it in items] + [solution(it) for it in items]
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


def tiny_config(vocab_size, eos_id, pad_id, hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=288, max_positions=512):
    """A Qwen2 config.json (q/k/v bias, tied embeddings), as transformers writes it; the defaults are
    the shipped preset (4 layers of width 96, 4 query / 2 key-value heads: ~0.45M parameters)."""
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
    tokenizer = train_tokenizer(out_dir, vocab_size=vocab_size, n_texts=n_texts)
    eos_id, pad_id = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = tiny_config(tokenizer.get_vocab_size(), eos_id, pad_id, **model_kwargs)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [eos_id], "pad_token_id": pad_id}, f, indent=2)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(config)).init_weights()
    checkpoint.save_model(model, out_dir)  # (writes config.json too)
    return out_dir


def pretraining_text(rng):
    """One pretraining document (plain text, no chat template), chosen among the three kinds."""
    kind = rng.random()
    if kind < 0.4:
        a, b = rng.randint(1, 9999) / 10000, rng.randint(1, 9999) / 10000
        columns, result = subtraction_columns(a, b)
        return f"{difference(a, b)}\n{' '.join(columns)}\n= {result}"
    item = make_problem(rng, no_path_share=0.2, variant="rephrased" if rng.random() < 0.2 else "base", easy_order=False)
    if kind < 0.7 or item["numbers"] is None:
        return item["problem"]
    shown = [float(t) for t in item["problem"].split("is ")[1:] if t[:1].isdigit() for t in [t[:6]]]
    return item["problem"] + "\nNumbers: " + " ".join(f"{p:.4f}" for p in shown)


def pretrain(folder, out_dir, steps, batch_size=32, lr=3e-3, seed=0, warmup_steps=50, log_every=25):
    """Language-model the folder's model on pretraining_text for `steps` AdamW steps (the trainers'
    optimiser and schedule: warmup, then cosine to 0.1 lr) and save it with its tokenizer to out_dir."""
    tokenizer, model = Tokenizer.from_pretrained(folder), checkpoint.load_model(folder)
    optimizer = training.make_optimizer(model, lr=lr)
    rng = random.Random(seed)
    model.train()
    for step in tqdm(range(steps), desc="pretrain"):
        docs = [tokenizer.encode(pretraining_text(rng)) + [tokenizer.eos_token_ids[0]] for _ in range(batch_size)]
        batch = data.pad_batch(docs, tokenizer.pad_token_id, [[1] * len(d) for d in docs])
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:]  # real tokens are targets
        logits = model(ids[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (losses * mask.flatten()).sum() / mask.sum()
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * training.lr_factor(step, steps, warmup_steps, min_lr_ratio=0.1)
        loss.backward()
        training.optimizer_step(optimizer, clip=1.0)
        if (step + 1) % log_every == 0:
            tqdm.write(f"pretrain step {step + 1} loss {loss.item():.4f}")
    model.eval()
    checkpoint.save_model(model, out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(folder, name), out_dir)
    return out_dir
