"""Shared training pieces: chunked log-probs against a full-logits reference, the schedule, checkpoints."""
import os

import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal.checkpoint import load_model, load_trainer_state, save_checkpoint
from nanocausal.logprobs import token_logprobs
from nanocausal.training import lr_factor, make_optimizer


def test_chunked_logprobs_and_grads_match_full_logits(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2")
    model = load_model(tmp_path)
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
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(55, 100, warmup_steps=10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(50, 100, warmup_steps=0, min_lr_ratio=1.0) == 1.0


def test_checkpoint_round_trip(tmp_path):
    make_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    model = load_model(tmp_path / "src")
    optimizer = make_optimizer(model, lr=1e-3)
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    optimizer.step()
    save_checkpoint(str(tmp_path / "ckpt"), model, tmp_path / "src", optimizer, {"step": 7})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "manifest.json", "model.safetensors",
                                                    "tokenizer.json", "trainer_state.pt"]
    expected_noise = torch.rand(3)
    reloaded = load_model(tmp_path / "ckpt")
    for a, b in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)
    optimizer2 = make_optimizer(reloaded, lr=1e-3)
    assert load_trainer_state(tmp_path / "ckpt", optimizer2) == {"step": 7}
    assert torch.equal(torch.rand(3), expected_noise)  # the RNG continues where the save left it
    assert optimizer2.state_dict()["state"][0]["step"] == 1


def test_a_trainer_state_that_unpickles_code_is_refused(tmp_path):
    """--resume reads trainer_state.pt with weights_only=True: a pickled object is never built."""
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    (tmp_path / "ckpt").mkdir()
    torch.save({"optimizer": None, "trainer_state": {"step": 1}, "rng": Payload()}, tmp_path / "ckpt" / "trainer_state.pt")
    with pytest.raises(ValueError, match="not a trainer state nanocausal can read safely"):
        load_trainer_state(tmp_path / "ckpt")
    assert not ran.exists()


def test_adamw_with_float32_moments_equals_torch_and_keeps_bf16_weights_bf16():
    from nanocausal.training import AdamW
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(5, 7)), None
    theirs = torch.nn.Parameter(ours.detach().clone())
    optimizers = AdamW([ours], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95),
                                                                             weight_decay=0.1)
    for _ in range(5):
        ours.grad = theirs.grad = torch.randn(5, 7)
        for optimizer in optimizers:
            optimizer.step()
    assert (ours - theirs).abs().max() <= 1e-6
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    optimizer = make_optimizer(model, lr=1e-3)
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    assert isinstance(optimizer, AdamW) and model.weight.dtype == torch.bfloat16
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_the_bf16_adamw_gives_its_state_to_fsdps_helpers():
    """A torchrun resume builds its template with get_optimizer_state_dict, which creates a fresh
    optimiser's state by calling step(closure=None): our float32-moment AdamW (bf16 weights) takes
    torch's signature, and its moments come out float32."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from nanocausal.training import AdamW
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    before = model.weight.detach().clone()
    optimizer = make_optimizer(model, lr=1e-3)
    assert isinstance(optimizer, AdamW)
    state = get_optimizer_state_dict(model, optimizer)["state"]
    assert state["weight"]["exp_avg"].dtype == torch.float32 and state["weight"]["exp_avg"].shape == (3, 4)
    assert torch.equal(model.weight, before)  # (its step had zero gradients: the weights did not move)
