"""Shared test fixtures and helpers: the read-only ../shared folder, tiny random checkpoints (the
transformers reference), the tiny chat model (nanocausal's BPE + a random Qwen2) the trainer tests
share, real SmolLM2, and running a script as a user does."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanocausal import data, tiny_base
from nanocausal.checkpoint import save_model
from nanocausal.model import ModelConfig, Transformer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the team's read-only shared folder) is not present")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_path(shared_dir):
    """SmolLM2-135M-Instruct as a Hugging Face folder, built once by ../shared/tools/make_smollm2.py
    and cached in ~/.cache/nanocausal (or $NANOCAUSAL_SMOLLM2) across runs."""
    out = subprocess.run([sys.executable, str(shared_dir / "tools" / "make_smollm2.py")],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"make_smollm2.py failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def make_hf_checkpoint(out_dir, model_type="qwen2", seed=0, **overrides):
    """Save a tiny random transformers model (the reference) as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, tie_word_embeddings=True)
    base.update(overrides)
    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                    "llama": transformers.LlamaConfig}[model_type]
    config = config_class(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random-init biases and norms are zero / one; perturb every tensor so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture
def tiny_qwen2(tmp_path):
    """A tiny random Qwen2 (q/k/v bias, tied head) folder and its transformers model."""
    path = tmp_path / "tiny-qwen2"
    return path, make_hf_checkpoint(path, "qwen2")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine it only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_examples(n, seed=0):
    """n short SFT-style causal questions with random answer JSONs (random, so only memory can learn them)."""
    rng = random.Random(seed)
    names = ["smoking", "rain", "income", "traffic", "diet", "stress", "sleep", "exercise"]
    out = []
    for i in range(n):
        x, y = rng.sample(names, 2)
        prob = f"{rng.random():.4f}"
        out.append({"prompt": f"Q{i}: ATE of {x} on {y}?",
                    "completion": json.dumps({"ANSWER": rng.choice(["Yes", "No"]), "PROB": prob})})
    return out


def make_tiny_chat_model(out_dir, seed=0, **model_kwargs):
    """A Hugging Face folder with nanocausal.tiny's byte-level BPE tokenizer (trained on few texts
    here, for speed; ChatML template, eos <|im_end|>, pad <|endoftext|>) and a tiny random Qwen2
    (q/k/v biases, tied head) of that vocabulary, written by nanocausal's own checkpoint.save_model."""
    tokenizer = tiny_base.train_tokenizer(str(out_dir), vocab_size=400, n_texts=300)
    eos_id, pad_id = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    config = tiny_base.tiny_config(tokenizer.get_vocab_size(), eos_id, pad_id, **{
        "hidden_size": 64, "num_layers": 2, "intermediate_size": 128, "max_positions": 256, **model_kwargs})
    (out_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(config))
    with torch.no_grad():  # random everything, biases and norms included, so each tensor matters
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.02)
    save_model(model, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model")


def write_jsonl(path, records):
    data.write_jsonl(path, records)
    return path


ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, check=True, env=None):
    """Run a top-level script (train_sft.py, eval.py, ...) in a subprocess, as a user does; returns
    the CompletedProcess (stdout and stderr as text)."""
    out = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def run_module(module, *args):
    """python -m module *args, as a user runs it; returns the CompletedProcess."""
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise AssertionError(f"python -m {module} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def help_of_every_flag(help_text):
    """{flag: its help text} parsed from an argparse --help output (the text after the flag's
    spelling, continuation lines included)."""
    flags, current = {}, None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            spelling, _, text = stripped.partition("  ")
            current = spelling.split(",")[0].split(" ")[0]
            flags[current] = text.strip()
        elif current is not None and line.startswith(" " * 6) and stripped:
            flags[current] = (flags[current] + " " + stripped).strip()
        else:
            current = None
    return flags
