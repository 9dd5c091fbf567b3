"""Shared test fixtures: the read-only ../shared folder, tiny random checkpoints, real SmolLM2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
