"""nanocausal.rl (GRPO, PPO) end to end on a tiny random model, in-process, on token ids (no tokenizer): the first
on-policy update is exactly on-policy, GRPO and PPO learn a trivially learnable reward, and an
interrupted + resumed run ends with the same weights as an uninterrupted one."""
import json
import os
import signal

import pytest
import torch

from conftest import help_of_every_flag, make_hf_checkpoint, run_script
from rl_worker import on_token_ids
from nanocausal.checkpoint import load_model
from nanocausal.model import Transformer
from nanocausal import rl
from nanocausal.rl import RLConfig, train_rl
from nanocausal.rollout import rollout

TARGET = 3  # the rewarded token
VOCAB = 16  # small, so the target is sampled often enough at first (1/16) for the groups to differ


def ends_with_target(example, completion_ids):
    return float(completion_ids[-1] == TARGET)


def prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(0, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-rl")
    make_hf_checkpoint(path, "qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    return path


def run(model, out_dir, reward_fn=ends_with_target, **fields):
    config = RLConfig(**{"model": str(model), "out_dir": str(out_dir), "device": "cpu", "eval_every": 0,
                         "prompts_per_step": 8, "max_new_tokens": 4, "micro_batch_size": 16, "warmup_steps": 0, **fields})
    with pytest.MonkeyPatch.context() as patch:  # token-id prompts and reward, no tokenizer
        on_token_ids(patch.setattr, reward_fn, prompts())
        trained = train_rl(config).model
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return trained, [json.loads(line) for line in f]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_first_update_is_on_policy(tiny_model, tmp_path, monkeypatch, algo):
    """Strictly on-policy the old log-probs are the trainer's own, detached: the ratio is exactly 1,
    nothing is clipped, and GRPO runs the model without gradient only in the sampler (no extra
    forward pass). The sampler/trainer gap is logged."""
    no_grad_forwards = []
    real = Transformer.hidden_states

    def counting(self, *args, **kwargs):
        if not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            no_grad_forwards.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", counting)
    off_by_half(monkeypatch)  # the ratio must not read the sampler's log-probs at all
    _, rows = run(tiny_model, tmp_path, algo=algo, steps=1, group_size=8, lr=1e-2, kl_coef=0.0)
    assert rows[0]["ratio_mean"] == 1.0
    assert rows[0]["clip_fraction"] == 0
    assert abs(rows[0]["sampler_logprob_gap"] - 0.5) < 1e-3  # logged
    if algo == "grpo":
        assert no_grad_forwards == []
    else:
        assert len(no_grad_forwards) == 8 * 8 // 16  # PPO's old values: one pass per micro-batch of the rollout


def test_rollouts_do_not_depend_on_the_slot_count(tiny_model):
    """--rollout-slots bounds the rows decoded at once (a finished group's rows take the next prompt):
    the same completions and sampler log-probs for every slot count, only less KV cache."""
    model = load_model(tiny_model)
    prompt_ids = [p["prompt_ids"] for p in prompts(5)]
    batches = [rollout(model, prompt_ids, 3, 6, 1.0, 1.0, 0, seed=7, eos_token_ids=[TARGET], pad_token_id=0,
                       vocab_size=VOCAB, slots=slots) for slots in (None, 3, 7)]
    assert any(len(c) < 6 for c in batches[0].completions)  # some end early: refill has work to do
    for batch in batches[1:]:
        assert batch.completions == batches[0].completions
        assert torch.equal(batch.input_ids, batches[0].input_ids)
        torch.testing.assert_close(batch.sampler_logprobs, batches[0].sampler_logprobs, rtol=0, atol=1e-5)


def test_off_policy_old_logprobs_come_from_the_training_forward(tiny_model, tmp_path, monkeypatch):
    """Two epochs: the old log-probs are recomputed once by the training forward under no_grad (one
    pass per micro-batch), then held fixed; the first pass sees a ratio of 1 up to float rounding."""
    seen = []
    real = rl.grpo_loss
    monkeypatch.setattr(rl, "grpo_loss", lambda logps, old, *a, **k: seen.append((logps.detach(), old)) or real(logps, old, *a, **k))
    off_by_half(monkeypatch)
    _, rows = run(tiny_model, tmp_path, steps=1, group_size=8, lr=1e-2, ppo_epochs=2)
    first_logps, first_old = seen[0]
    mask = first_old != 0
    assert (first_logps - first_old)[mask].abs().max() < 1e-5  # recomputed, not the sampler's (0.5 away)
    assert not torch.equal(seen[-1][0], seen[-1][1])  # epoch 2: the policy moved, the old log-probs did not
    assert abs(rows[0]["sampler_logprob_gap"] - 0.5) < 0.05  # averaged over both epochs (the second moved)


def off_by_half(monkeypatch):
    """Make the sampler's log-probs 0.5 below the truth (a sampler that rounds badly)."""
    real = rl.rollout

    def rollout(*args, **kwargs):
        batch = real(*args, **kwargs)
        batch.sampler_logprobs = batch.sampler_logprobs - 0.5 * batch.completion_mask
        return batch
    monkeypatch.setattr(rl, "rollout", rollout)


def test_grpo_learns_a_trivial_reward(tiny_model, tmp_path):
    _, rows = run(tiny_model, tmp_path, steps=20, group_size=8, lr=1e-2)
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.2 and last > 0.8, [round(r["reward"], 2) for r in rows]


def test_ppo_learns_a_trivial_reward(tiny_model, tmp_path):
    _, rows = run(tiny_model, tmp_path, algo="ppo", steps=20, group_size=8, lr=1e-2, kl_coef=0.0)
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.2 and last > 0.8, [round(r["reward"], 2) for r in rows]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_ctrl_c_then_resume_equals_uninterrupted(tiny_model, tmp_path, algo):
    flags = dict(algo=algo, steps=4, group_size=4, lr=1e-2, ppo_epochs=2, mini_batches=2, micro_batch_size=5,
                 save_every=100, beta=0.1)  # beta: GRPO's reference model too
    uninterrupted, _ = run(tiny_model, tmp_path / "a", **flags)

    calls = []

    def interrupting_reward(example, completion_ids):
        calls.append(1)
        if len(calls) == 8 * 4 * 2:  # while scoring step 2: the step finishes, then the checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return ends_with_target(example, completion_ids)

    run(tiny_model, tmp_path / "b", reward_fn=interrupting_reward, **flags)
    state = torch.load(tmp_path / "b" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["trainer_state"]["step"] == 2
    resumed, rows = run(tiny_model, tmp_path / "b", resume=True, **flags)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if algo == "ppo":
        assert os.path.isfile(tmp_path / "b" / "checkpoint" / "value_head.safetensors")
    reloaded = load_model(tmp_path / "b" / "checkpoint")
    assert torch.equal(reloaded.embed_tokens.weight, resumed.embed_tokens.weight)


def test_help_explains_every_flag():
    # One parse, one --help: each algorithm's own settings under its own heading.
    out = run_script("train_rl.py", "--help").stdout
    for flag, text in help_of_every_flag(out).items():
        assert len(text) > 10, flag
    grpo, ppo = out.index("\nGRPO ("), out.index("\nPPO (")
    assert grpo < out.index("\n  --beta BETA") < ppo < out.index("\n  --kl-coef KL_COEF")


def test_causal_prompts_rewards_and_evaluation(shared_dir, tmp_path):
    """The users' path on a tiny model with the real Qwen2.5 tokenizer: problems generated by
    nanocausal.problems, official rewards, a reference model (beta > 0: every row is trained even when
    all rewards are 0), evaluation on held-out problems with completions printed."""
    model_dir = tmp_path / "tiny-qwen-vocab"
    make_hf_checkpoint(model_dir, "qwen2", vocab_size=151936, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    for name in os.listdir(shared_dir / "tokenizers" / "qwen2.5"):
        (model_dir / name).write_bytes((shared_dir / "tokenizers" / "qwen2.5" / name).read_bytes())
    out_dir = tmp_path / "out"
    out = run_script("train_rl.py", "--model", model_dir, "--out-dir", out_dir, "--device", "cpu", "--steps", 1,
                     "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 6, "--tasks", "ATE,PN",
                     "--variant", "base,insufficient", "--eval-every", 1, "--eval-problems", 2,
                     "--eval-max-new-tokens", 4, "--show-completions", 1, "--beta", 0.01)
    with open(out_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_row = next(r for r in rows if "reward" in r)
    for key in ("reward", "accuracy", "format_rate", "equal_reward_groups", "completion_len", "truncated",
                "kl", "clip_fraction", "entropy", "generation_s", "training_s", "generation_tokens_per_s"):
        assert key in train_row, key
    assert train_row["truncated"] == 1.0 and train_row["completion_len"] == 6  # a random model never stops
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 1]
    assert "gold" in out.stdout + out.stderr  # a completion was shown
    assert os.path.isfile(out_dir / "checkpoint" / "tokenizer.json")


def test_report_to_tensorboard_holds_the_metrics_jsonl_scalars(tiny_model, tmp_path):
    """The acceptance run of #20: a tiny GRPO run through the real loop with --report-to
    tensorboard; every numeric metrics.jsonl value is an event at its step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, rows = run(tiny_model, tmp_path, steps=3, group_size=4, lr=1e-2, report_to="tensorboard", run_name="tb")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                got = {e.step: e.value for e in events.Scalars(key)}
                assert got[row["step"]] == pytest.approx(value, rel=1e-6), key


def test_allow_changed_args_applies_a_new_lr_and_value_lr(tiny_model, tmp_path, monkeypatch):
    """--allow-changed-args with a new --lr / --value-lr: every parameter group of the resumed
    optimiser follows the new settings (the restored peak lrs would otherwise win), PPO's value
    head group its own value_lr; the moments still come from the checkpoint."""
    flags = dict(algo="ppo", group_size=4, kl_coef=0.0, save_every=1)
    run(tiny_model, tmp_path, steps=1, lr=1e-3, value_lr=1e-4, **flags)
    seen = []
    real = rl.training.optimizer_step

    def recording(optimizer, clip):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return real(optimizer, clip)

    monkeypatch.setattr(rl.training, "optimizer_step", recording)
    _, rows = run(tiny_model, tmp_path, steps=2, lr=2e-3, value_lr=5e-3, resume=True, allow_changed_args=True, **flags)
    assert seen == [[2e-3, 2e-3, 5e-3]]  # min_lr_ratio 1, no warmup: the peak lrs themselves
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-3), (2, 2e-3)]
    with pytest.raises(ValueError, match=r"other settings .*lr 0\.002 -> 0\.004"):
        run(tiny_model, tmp_path, steps=3, lr=4e-3, value_lr=5e-3, resume=True, **flags)


# -----------------------------------------------------------------------------
# Truncated completions and dynamic sampling (issue #29)


@pytest.fixture(scope="module")
def tiny_model_with_eos(tmp_path_factory):
    """The tiny model with TARGET as its EOS: a completion either ends with it or is cut at max_new_tokens."""
    path = tmp_path_factory.mktemp("tiny-rl-eos")
    make_hf_checkpoint(path, "qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, eos_token_id=TARGET)
    return path


def spy_on(monkeypatch, name):
    """Record the arguments of every call of rl.<name> (tensors cloned), then call it."""
    calls, real = [], getattr(rl, name)

    def spy(*args, **kwargs):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in args] + [kwargs])
        return real(*args, **kwargs)
    monkeypatch.setattr(rl, name, spy)
    return calls


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_truncated_completions_masked_or_counted(tiny_model_with_eos, tmp_path, monkeypatch, mask_truncated):
    """max_new_tokens 3 cuts most completions. --mask-truncated: no loss token comes from a truncated row
    (the batch's mask, every loss call's normaliser, the log); without it the log shows their share."""
    updates, losses = spy_on(monkeypatch, "update"), spy_on(monkeypatch, "grpo_loss")
    _, rows = run(tiny_model_with_eos, tmp_path, steps=1, group_size=4, lr=1e-2, max_new_tokens=3,
                  mask_truncated=mask_truncated)
    batch = updates[0][3]
    truncated = torch.tensor(batch.truncated)
    lengths = torch.tensor([len(c) for c in batch.completions])
    assert rows[0]["truncated"] == truncated.float().mean().item() > 0.5
    mask = batch.completion_mask
    if mask_truncated:
        assert mask[truncated].sum() == 0 and torch.equal(mask[~truncated].sum(1), lengths[~truncated])
        assert rows[0]["truncated_loss_tokens"] == 0
        assert all(call[-1]["num_items_in_batch"] == lengths[~truncated].sum() for call in losses)
        assert all(call[3].sum() > 0 for call in losses)  # masked rows are not even run
    else:
        share = lengths[truncated].sum() / lengths.sum()
        assert rows[0]["truncated_loss_tokens"] == pytest.approx(share.item()) and share > 0.5
        assert all(call[-1]["num_items_in_batch"] == lengths.sum() for call in losses)


def test_dynamic_sampling_trains_informative_groups(tiny_model, tmp_path, monkeypatch):
    """Groups of 2 rarely differ here (the reward is 1 for ~1 completion in 16): every step trains
    prompts_per_step informative groups, or says how many it found in max_sampling_rounds rounds; the
    first round samples exactly what the default run samples (the same random streams)."""
    default_rollouts = spy_on(monkeypatch, "rollout")
    run(tiny_model, tmp_path / "default", steps=1, group_size=2, lr=1e-2)
    monkeypatch.undo()
    rollouts, updates = spy_on(monkeypatch, "rollout"), spy_on(monkeypatch, "update")
    _, rows = run(tiny_model, tmp_path / "dynamic", steps=3, group_size=2, lr=1e-2, dynamic_sampling=True,
                  max_sampling_rounds=6)
    assert rows[0]["sampling_rounds"] > 1  # the first round alone did not fill the step
    assert sum(r["sampling_rounds"] for r in rows) == len(rollouts)
    for row, call in zip(rows, updates):
        batch = call[3]
        assert row["prompts_drawn"] == 8 * row["sampling_rounds"]
        assert len(batch.completions) == 8 * 2  # always prompts_per_step groups
        differs = [a != b for a, b in zip(batch.advantages[0::2].tolist(), batch.advantages[1::2].tolist())]
        kept = row["groups_kept"]
        assert differs == [True] * kept + [False] * (8 - kept)  # informative groups first, then the top-up
        assert kept == 8 or row["sampling_rounds"] == 6
    # round 0 of step 1 samples what the default run sampled at step 1 (same seed, same prompt keys)
    assert rollouts[0][1] == default_rollouts[0][1]
    assert rollouts[0][-1]["prompt_keys"] == default_rollouts[0][-1]["prompt_keys"]


@pytest.mark.parametrize("flags, message", [
    (["--overlong-buffer", "200", "--max-new-tokens", "100"], "--overlong-buffer 200: expected 0 (off) to --max-new-tokens 100"),
    (["--top-entropy-quantile", "0"], "--top-entropy-quantile: must be a finite number in (0, 1]"),
    (["--rewards", "correct,speed"], "--rewards correct,speed: unknown speed"),
    (["--rewards", "correct,format", "--reward-weights", "1"], "--reward-weights 1: expected 2 comma-separated finite numbers"),
    (["--reward-weights", "1"], "--reward-weights needs --rewards"),
    (["--dynamic-sampling", "--group-size", "1"], "--group-size must be >= 2"),
    (["--reward", "step", "--rewards", "correct"], "--reward step credits tokens relative to the default reward"),
    (["--curriculum", "adaptive", "--data", "prompts.jsonl"], "--curriculum adaptive generates its tiny problems"),
])
def test_bad_option_values_are_one_line_errors_before_anything_runs(tmp_path, flags, message):
    out = run_script("train_rl.py", "--model", tmp_path / "no-model", "--out-dir", tmp_path / "out", *flags, check=False)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_compile_decode_reaches_the_generator_and_changes_no_rollout(tiny_model, tmp_path, monkeypatch):
    """--compile-decode is handed to generate_many by the rollouts (its compiled-vs-eager token
    parity is tests/test_generate.py's); the flag changes nothing the run computes otherwise."""
    from nanocausal import rollout as rollout_module
    seen, real = [], rollout_module.generate_many

    def recording(*args, compile_decode=False, **kwargs):
        seen.append(compile_decode)
        return real(*args, **kwargs)  # eager here: compiling takes minutes on CPU
    monkeypatch.setattr(rollout_module, "generate_many", recording)
    _, plain = run(tiny_model, tmp_path / "plain", steps=2, group_size=4, lr=1e-2)
    _, flagged = run(tiny_model, tmp_path / "flagged", steps=2, group_size=4, lr=1e-2, compile_decode=True)
    assert seen == [False, False, True, True]
    assert [r["reward"] for r in plain] == [r["reward"] for r in flagged]
    assert [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in flagged]
