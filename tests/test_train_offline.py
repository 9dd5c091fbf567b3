"""SFT, DPO and KTO (nanocausal.offline) on a tiny chat model: the real step
functions and the real loop, called with configs as pipeline.py calls them; and the scripts
train_sft.py / train_pref.py run as a user runs them."""
import json
import os
import signal

import pytest
import torch

from conftest import help_of_every_flag, make_tiny_chat_model, run_script, tiny_examples, write_jsonl
from nanocausal import data, training
from nanocausal.checkpoint import load_model
from nanocausal.model import Transformer
from nanocausal.logprobs import sequence_logprobs, token_logprobs
from nanocausal.losses import dpo_loss, kto_loss, sft_loss
from nanocausal.offline import (PreferenceConfig, Reference, SFTConfig, dpo_backward, kto_backward, sft_backward,
                                train_offline)
from nanocausal.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model", max_positions=2048)


def dpo_records(n, seed=0):
    chosen, wrong = tiny_examples(n, seed), tiny_examples(n, seed + 100)
    return [{"prompt": c["prompt"], "chosen": c["completion"], "rejected": w["completion"]} for c, w in zip(chosen, wrong)]


def kto_records(n, seed=0):
    good, wrong = tiny_examples(n, seed), tiny_examples(n, seed + 100)
    return [{"prompt": g["prompt"], "completion": g["completion"] if i % 2 == 0 else w["completion"], "label": i % 2 == 0}
            for i, (g, w) in enumerate(zip(good, wrong))]


def run(model, data_file, out_dir, algo="sft", **fields):
    """Train through the library, as pipeline.py does; returns the rows of metrics.jsonl."""
    common = dict(model=str(model), data=str(data_file), out_dir=str(out_dir), device="cpu", eval_every=0,
                  log_every=1000, **fields)
    train_offline(SFTConfig(**common) if algo == "sft" else PreferenceConfig(algo=algo, **common))
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def weights(folder):
    return dict(load_model(folder).named_parameters())


@torch.no_grad()
def final_metrics(reference_folder, policy_folder, data_file, algo):
    """DPO / KTO metrics of a trained policy against its reference on every example of data_file."""
    tokenizer = Tokenizer.from_pretrained(policy_folder)
    rows = data.tokenize(data.load_examples(data_file, algo), tokenizer, algo, progress=False)
    batch = data.COLLATE[algo](rows, tokenizer.pad_token_id)
    policy, reference = load_model(policy_folder), load_model(reference_folder)
    logps = [sequence_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
             for m in (policy, reference)]
    if algo == "dpo":
        (chosen, rejected), (ref_chosen, ref_rejected) = logps[0].chunk(2), logps[1].chunk(2)
        return {k: v.item() for k, v in dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)[1].items()}
    kl = [sequence_logprobs(m, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])
          for m in (policy, reference)]
    return {k: v.item() for k, v in kto_loss(logps[0], logps[1], kl[0], kl[1], batch["desirable"])[1].items()}


# -----------------------------------------------------------------------------
# Gradient accumulation: one batch of 8 == 8 micro-batches of 1, through the trainers' step functions


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_gradient_accumulation_invariance(tiny_chat_model, tmp_path, kind):
    records = {"sft": tiny_examples(8), "dpo": dpo_records(8), "kto": kto_records(8)}[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
    rows = data.tokenize(data.load_examples(path, kind), tokenizer, kind, progress=False)
    model = load_model(tiny_chat_model)
    config = PreferenceConfig(algo=kind if kind != "sft" else "dpo", device="cpu", beta=0.5)
    reference = Reference(load_model(tiny_chat_model), "cpu")
    with torch.no_grad():  # policy != reference, so the DPO/KTO log-ratios are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)

    def gradients(batch_size):
        model.zero_grad()
        batches = data.micro_batches(rows, list(range(8)), data.COLLATE[kind], tokenizer.pad_token_id, batch_size, "cpu")
        if kind == "sft":
            metrics = sft_backward(model, batches, "cpu")
        else:
            metrics = (dpo_backward if kind == "dpo" else kto_backward)(model, reference, batches, config)
        return [p.grad.clone() for p in model.parameters()], metrics

    one_batch, metrics_one = gradients(8)
    accumulated, metrics_acc = gradients(1)
    assert max((a - b).abs().max().item() for a, b in zip(one_batch, accumulated)) <= 1e-5
    assert sum(g.abs().sum() for g in one_batch) > 0
    for key in metrics_one:  # summed log-probs are ~ -100: compare relative to their size
        assert torch.allclose(torch.as_tensor(metrics_one[key]).float(), torch.as_tensor(metrics_acc[key]).float(),
                              rtol=1e-5, atol=1e-5), key


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_right_padded_batches_need_no_attention_mask(tiny_chat_model, tmp_path, monkeypatch, kind):
    # Issue #28: the offline steps call the model with attention_mask=None (plain causal attention,
    # flash's fast path), and on a right-padded batch their loss is exactly the one with the mask:
    # a real token never attends to the padding after it. (Bitwise on CPU, gradients too: the pipeline's
    # table is unchanged.)
    records = {"sft": tiny_examples(8), "dpo": dpo_records(8), "kto": kto_records(8)}[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
    rows = data.tokenize(data.load_examples(path, kind), tokenizer, kind, progress=False)
    model, reference = load_model(tiny_chat_model), load_model(tiny_chat_model)
    with torch.no_grad():  # policy != reference, so the DPO/KTO log-ratios are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    config = PreferenceConfig(algo=kind if kind != "sft" else "dpo", device="cpu", beta=0.5)
    batches = data.micro_batches(rows, list(range(8)), data.COLLATE[kind], tokenizer.pad_token_id, 8, "cpu")
    assert (batches[0]["attention_mask"] == 0).any()  # padded, on the right
    assert torch.equal(batches[0]["attention_mask"].sort(-1, descending=True)[0], batches[0]["attention_mask"])

    def step_loss():  # the step's loss and gradients
        model.zero_grad()
        if kind == "sft":
            loss = sft_backward(model, batches, "cpu")["loss"]
        else:
            loss = (dpo_backward if kind == "dpo" else kto_backward)(model, Reference(reference, "cpu"), batches, config)["loss"]
        return loss, [p.grad.clone() for p in model.parameters()]

    hidden_states, masks_seen = Transformer.hidden_states, []

    def spy(self, input_ids, attention_mask=None, *args, **kwargs):
        masks_seen.append(attention_mask)
        return hidden_states(self, input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", spy)
    without_mask, grads_without = step_loss()
    assert masks_seen and all(mask is None for mask in masks_seen)

    def with_padding_mask(self, input_ids, attention_mask=None, *args, **kwargs):
        # the batch's own mask for these ids (the policy's rows or KTO's KL pairs)
        mask = next(b[k.replace("input_ids", "attention_mask")] for b in batches for k in b
                    if k.endswith("input_ids") and b[k].shape == input_ids.shape and torch.equal(b[k], input_ids))
        return hidden_states(self, input_ids, mask, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", with_padding_mask)
    with_mask, grads_with = step_loss()
    assert torch.equal(with_mask, without_mask)
    assert all(torch.equal(a, b) for a, b in zip(grads_with, grads_without))


# -----------------------------------------------------------------------------
# Learning


def test_sft_memorises_16_examples(tiny_chat_model, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", tiny_examples(16))
    log = run(tiny_chat_model, path, tmp_path / "out", steps=120, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=5)
    assert log[0]["loss"] > 3 and log[-1]["loss"] < 0.05
    # The checkpoint is the trained model: its own loss on the data is that low too.
    model, tokenizer = load_model(tmp_path / "out" / "checkpoint"), Tokenizer.from_pretrained(tmp_path / "out" / "checkpoint")
    rows = data.tokenize(data.load_examples(path, "sft"), tokenizer, "sft", progress=False)
    batch = data.collate_sft(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert sft_loss(logprobs, batch["completion_mask"])[0] < 0.05


def test_dpo_reaches_full_preference_accuracy(tiny_chat_model, tmp_path):
    path = write_jsonl(tmp_path / "dpo.jsonl", dpo_records(16))
    log = run(tiny_chat_model, path, tmp_path / "out", "dpo", steps=40, batch_size=8, lr=3e-3, warmup_steps=2, beta=0.1)
    assert log[0]["reward_margin"] == 0.0 and log[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference
    assert log[-1]["reward_margin"] > log[0]["reward_margin"] and log[-1]["loss"] < 0.5
    # The trained checkpoint against the reference, on all 16 pairs: every pair is now preferred.
    metrics = final_metrics(tiny_chat_model, tmp_path / "out" / "checkpoint", path, "dpo")
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 1.0
    assert metrics["chosen_reward"] > 0 > metrics["rejected_reward"]


def test_kto_moves_desirable_up_and_undesirable_down(tiny_chat_model, tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", kto_records(16))
    log = run(tiny_chat_model, path, tmp_path / "out", "kto", steps=30, batch_size=8, lr=3e-3, warmup_steps=2,
              precompute_ref=True)
    # Step 1: policy == reference (precomputed in other batches: equal up to float rounding).
    assert log[0]["desirable_reward"] == pytest.approx(0, abs=1e-5) and log[0]["undesirable_reward"] == pytest.approx(0, abs=1e-5)
    assert log[0]["z0"] == pytest.approx(0, abs=1e-5)
    assert log[-1]["desirable_reward"] > 0.5 and log[-1]["undesirable_reward"] < -0.5
    assert all(row["z0"] >= 0 for row in log)
    metrics = final_metrics(tiny_chat_model, tmp_path / "out" / "checkpoint", path, "kto")  # all 16 examples
    assert metrics["desirable_reward"] > 0.5 and metrics["undesirable_reward"] < -0.5


# -----------------------------------------------------------------------------
# Checkpoints


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_chat_model, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "dpo.jsonl", dpo_records(12))
    flags = dict(steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, save_every=100)
    full = run(tiny_chat_model, path, tmp_path / "full", "dpo", **flags)

    lr_factor = training.lr_factor

    def lr_then_ctrl_c(step, *args, **kwargs):
        if step == 3:  # Ctrl-C arrives during the 4th step: it finishes, is saved, and the run stops
            signal.raise_signal(signal.SIGINT)
        return lr_factor(step, *args, **kwargs)

    monkeypatch.setattr(training, "lr_factor", lr_then_ctrl_c)
    interrupted = run(tiny_chat_model, path, tmp_path / "split", "dpo", **flags)
    assert [row["step"] for row in interrupted] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "split" / "checkpoint" / "trainer_state.pt", weights_only=True)["trainer_state"]["step"] == 4
    monkeypatch.setattr(training, "lr_factor", lr_factor)
    resumed = run(tiny_chat_model, path, tmp_path / "split", "dpo", resume=True, **flags)

    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in resumed] == [row["loss"] for row in full]
    final, split = weights(tmp_path / "full" / "checkpoint"), weights(tmp_path / "split" / "checkpoint")
    for name in final:
        assert torch.equal(final[name], split[name]), name


def test_checkpoint_loads_in_transformers_with_the_same_logits(tiny_chat_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_jsonl(tmp_path / "kto.jsonl", kto_records(4))
    run(tiny_chat_model, path, tmp_path / "out", "kto", steps=2, batch_size=4, lr=1e-2)
    folder = tmp_path / "out" / "checkpoint"
    ours = load_model(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not torch.equal(ours.embed_tokens.weight, load_model(tiny_chat_model).embed_tokens.weight)
    prompt = [{"role": "user", "content": "Is the ATE positive?"}]
    ids = torch.tensor([Tokenizer.from_pretrained(folder).encode_chat_completion(prompt, '{"PROB": "0.1234"}')[0]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


# -----------------------------------------------------------------------------
# The command line


def test_on_the_fly_data_and_evaluation_through_the_sampler(tiny_chat_model, tmp_path):
    # No --data: the generator makes the problems; evaluation samples held-out problems and scores
    # them officially, before the first step and every --eval-every steps. The script, as a user runs it.
    run_script("train_sft.py", "--model", tiny_chat_model, "--num-train", 4, "--tasks", "ATE", "--steps", 2,
               "--batch-size", 2, "--lr", 1e-3, "--eval-every", 2, "--eval-problems", 2, "--eval-max-new-tokens", 4,
               "--device", "cpu", "--out-dir", tmp_path / "out")
    log = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [row["step"] for row in log] == [0, 1, 2, 2] and log[-1]["eval_acc"] == 0.0  # 4 tokens cannot hold an answer
    assert "eval_acc_ATE" in log[-1]
    assert os.path.isfile(tmp_path / "out" / "checkpoint" / "tokenizer.json")


def test_bad_data_file_error_names_file_and_line(tiny_chat_model, tmp_path):
    path = tmp_path / "dpo.jsonl"
    path.write_text(json.dumps(dpo_records(1)[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: missing field 'rejected'"):
        run(tiny_chat_model, path, tmp_path / "out", "dpo", steps=1)
    long = write_jsonl(tmp_path / "long.jsonl", tiny_examples(2) + [{"prompt": "p", "completion": "x y z " * 100}])
    with pytest.raises(ValueError, match=rf"{long}:3: prompt \+ completion is \d+ tokens, longer than the context of 128"):
        run(tiny_chat_model, long, tmp_path / "out", steps=1, max_length=128)
    # From the command line the same error is one line, without a traceback.
    out = run_script("train_pref.py", "--model", tiny_chat_model, "--data", path, "--out-dir", tmp_path / "cli",
                     "--device", "cpu", "--steps", 1, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}:2: missing field 'rejected'")


@pytest.mark.parametrize("script", ["train_sft.py", "train_pref.py"])
def test_every_flag_has_help(script):
    out = run_script(script, "--help").stdout
    flags = help_of_every_flag(out)
    assert {"--model", "--data", "--steps", "--lr", "--out-dir", "--resume", "--eval-every"} <= set(flags)
    for flag, text in flags.items():
        assert len(text) > 10, flag
    assert "One GPU" in out and "Laptop" in out


@pytest.mark.parametrize("flags, message", [(["--batch-size", "-2"], "--batch-size: must be a positive integer"),
                                            (["--grad-accum", "0"], "--grad-accum: must be a positive integer"),
                                            (["--steps", "0"], "--steps: must be a positive integer"),
                                            (["--lr", "nan"], "--lr: must be a finite number >= 0")])
def test_nonsensical_numbers_are_refused_by_name(flags, message):
    out = run_script("train_sft.py", *flags, check=False)
    assert out.returncode == 2 and message in out.stderr
