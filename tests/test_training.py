"""Shared training pieces: chunked log-probs against a full-logits reference, schedule, checkpoints."""
import os

import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal.model import Transformer
from nanocausal.training import cosine_lr, load_trainer_state, make_optimizer, save_checkpoint, token_logprobs


def test_chunked_logprobs_and_grads_match_full_logits(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2")
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, :4] = 0  # a left-padded row
    completion = torch.zeros_like(ids)
    completion[:, 12:] = 1
    completion[2, 17:] = 0  # a shorter completion
    ours, entropy = token_logprobs(model, ids, attention, completion, temperature=0.7, chunk_size=7, return_entropy=True)
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logprobs = torch.log_softmax(model(ids, attention_mask=attention).float() / 0.7, dim=-1)
    ref = torch.zeros(ids.shape)
    ref[:, 1:] = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_entropy = torch.zeros(ids.shape)
    ref_entropy[:, 1:] = -(logprobs.exp() * logprobs).sum(-1)[:, :-1]
    ref, ref_entropy = ref * completion, ref_entropy * completion
    ref.sum().backward()
    assert (ours - ref).abs().max() <= 1e-5
    assert (entropy - ref_entropy).abs().max() <= 1e-4
    for g, p in zip(grads, model.parameters()):
        assert (g - p.grad).abs().max() <= 1e-5


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lr(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)


def test_checkpoint_round_trip(tmp_path):
    make_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    model = Transformer.from_pretrained(tmp_path / "src")
    optimizer = make_optimizer(model, lr=1e-3)
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    optimizer.step()
    save_checkpoint(str(tmp_path / "ckpt"), model, tmp_path / "src", optimizer, {"step": 7})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"]
    expected_noise = torch.rand(3)
    reloaded = Transformer.from_pretrained(tmp_path / "ckpt")
    for a, b in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)
    optimizer2 = make_optimizer(reloaded, lr=1e-3)
    assert load_trainer_state(tmp_path / "ckpt", optimizer2) == {"step": 7}
    assert torch.equal(torch.rand(3), expected_noise)  # the RNG continues where the save left it
    assert optimizer2.state_dict()["state"][0]["step"] == 1
