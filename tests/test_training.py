"""Shared training pieces: chunked log-probs against a full-logits reference, the schedule, checkpoints,
the settings (config fields that are their flags)."""
import argparse
import dataclasses
import os

import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal import cli
from nanocausal.checkpoint import load_model, load_trainer_state, save_checkpoint
from nanocausal.config import PreferenceConfig, RLConfig, SFTConfig, TrainConfig
from nanocausal.evaluation import EvalConfig
from nanocausal.offline import train_offline
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


def test_bf16_weights_follow_the_float32_run_at_the_readme_lr():
    """At GRPO's full-fine-tuning lr (1e-6, README) a step moves a weight near 0.02 by ~1e-6, far
    under bf16's half-step there (6e-5). Our AdamW keeps each weight's lower 16 bits (state
    low_bits): the float32 weight it tracks moves as torch's float32 AdamW moves from the same start
    (total update within 0.1 %), and the bf16 weights are that run's rounded to bf16 (>= 99.5 %;
    the rest sit on a rounding tie that float32 arithmetic order tips). Rounding every step into
    bf16 (no low bits, what the optimiser did before) loses most of the update."""
    from nanocausal.optimizer import AdamW, join_float32
    torch.manual_seed(0)
    start = (torch.randn(20000) * 0.02).bfloat16()
    direction = torch.randn(20000)
    ours, plain, reference = (torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone()),
                              torch.nn.Parameter(start.float()))
    optimizers = [AdamW([ours], lr=1e-6, weight_decay=0.1), AdamW([plain], lr=1e-6, weight_decay=0.1),
                  torch.optim.AdamW([reference], lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1)]
    for step in range(100):
        gradient = direction + 0.5 * torch.randn(20000)
        ours.grad, plain.grad, reference.grad = gradient.bfloat16(), gradient.bfloat16(), gradient.bfloat16().float()
        for optimizer in optimizers:
            optimizer.step()
        optimizers[1].state[plain]["low_bits"].zero_()
    low = optimizers[0].state[ours]["low_bits"]
    assert ours.dtype == torch.bfloat16 and low.dtype == torch.int16
    target = reference.detach() - start.float()

    def error(weights):
        return ((weights.float() - start.float() - target).norm() / target.norm()).item()
    assert error(join_float32(ours.detach(), low)) < 1e-3
    assert (ours.detach() == reference.detach().bfloat16()).float().mean() >= 0.995
    assert error(plain.detach()) > 0.5


def test_a_resumed_bf16_run_continues_bit_for_bit(tmp_path):
    """The low 16 bits of every bf16 weight are optimiser state: saved in trainer_state.pt, restored on
    resume, so two steps after a save and reload equal two steps without one."""
    make_hf_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    model = load_model(tmp_path / "src", dtype=torch.bfloat16)
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    batches = [torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def step(model, optimizer, ids):
        model(ids).float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for ids in batches[:2]:
        step(model, optimizer, ids)
    save_checkpoint(str(tmp_path / "ckpt"), model, tmp_path / "src", optimizer, {"step": 2})
    resumed = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    resumed_optimizer = make_optimizer(resumed, lr=1e-4, weight_decay=0.1)
    load_trainer_state(tmp_path / "ckpt", resumed_optimizer)
    assert all(s["low_bits"].dtype == torch.int16 and s["low_bits"].any() for s in resumed_optimizer.state.values())
    for ids in batches[2:]:
        step(model, optimizer, ids)
        step(resumed, resumed_optimizer, ids)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), resumed_optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in ("exp_avg", "exp_avg_sq", "low_bits"))


def test_the_tiny_model_learns_as_much_in_bf16_as_in_float32(tmp_path, monkeypatch):
    """SFT of data/tiny-base at the README's full-fine-tuning lr (1e-5), 20 steps: the training loss
    falls as far with bf16 weights as with float32 ones (within 10 % of the fall); rounding every
    update into bf16 (the optimiser before low_bits, simulated by dropping them) falls less than
    half as far."""
    from conftest import ROOT, tiny_examples, write_jsonl
    from nanocausal import optimizer
    data = write_jsonl(tmp_path / "sft.jsonl", tiny_examples(64))

    def loss_fall(dtype, name):
        result = train_offline(SFTConfig(model=str(ROOT / "data" / "tiny-base"), data=str(data), out_dir=str(tmp_path / name),
                                     device="cpu", dtype=dtype, steps=20, batch_size=8, lr=1e-5, warmup_steps=0,
                                     min_lr_ratio=1.0, save_every=100, eval_every=0))
        losses = [row["loss"] for row in result.history]
        return sum(losses[:3]) / 3 - sum(losses[-3:]) / 3
    float32, bfloat16 = loss_fall("float32", "f32"), loss_fall("bfloat16", "bf16")
    assert float32 > 1.0 and abs(bfloat16 - float32) < 0.1 * float32
    monkeypatch.setattr(optimizer, "split_float32", lambda w, high, low: (high.copy_(w), low.zero_()))
    assert loss_fall("bfloat16", "plain") < 0.5 * float32


# -----------------------------------------------------------------------------
# Settings: each config field is its flag (nanocausal/config.py, cli.setting)


@pytest.mark.parametrize("config_class", [SFTConfig, PreferenceConfig, RLConfig, EvalConfig])
def test_every_setting_is_one_flag_with_the_fields_help_type_and_default(config_class):
    parser = cli.parser_for("")
    cli.add_config_args(parser, config_class)
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(config_class):
        about, action = cli.about(config_class, field.name), actions[field.name]
        assert action.help == about["help"] and len(about["help"]) > 10, field.name  # one text, not two
        assert action.type is about.get("type") and action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.default == (None if field.default is dataclasses.MISSING else field.default), field.name
    if config_class is not EvalConfig:  # (eval needs --model and --data)
        assert cli.config_from_args(config_class, parser.parse_args([])) == config_class()
    # A subclass that changes only a default keeps its base's help: RL's --steps is still explained.
    assert cli.about(RLConfig, "steps")["help"] == cli.about(TrainConfig, "steps")["help"]


def test_a_config_refuses_what_its_flag_refuses_with_the_flags_message():
    for config_class, name, value in [(RLConfig, "top_entropy_quantile", 0.0), (RLConfig, "group_size", 0),
                                      (SFTConfig, "tasks", ("ATE", "XYZ")), (PreferenceConfig, "algo", "ipo"),
                                      (RLConfig, "lr", True), (SFTConfig, "batch_size", 2.5)]:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=f"^{flag} "):
            config_class(device="cpu", **{name: value})
        parse = cli.about(config_class, name).get("type")
        if parse is not None:  # the flag refuses the same text
            with pytest.raises(argparse.ArgumentTypeError):
                parse(",".join(value) if isinstance(value, tuple) else str(value))


def test_what_a_resumed_run_may_change_is_read_from_the_fields():
    rules = {}
    for config_class in (SFTConfig, PreferenceConfig, RLConfig):
        for field in dataclasses.fields(config_class):
            rules.setdefault(cli.about(config_class, field.name).get("resume"), set()).add(field.name)
    assert rules["content"] == {"model", "data", "ref_model"}
    assert rules["fixed"] == {"algo", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"}
    assert {"steps", "device", "out_dir", "eval_every", "micro_batch_size", "precompute_ref", "resume"} <= rules["free"]
    assert {"lr", "seed", "batch_size", "grad_accum", "beta", "group_size", "dtype"} <= rules[None]
    assert not rules["free"] & rules[None]  # (micro_batch_tokens is free in SFT's config and RL's alike)
