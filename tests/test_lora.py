"""LoRA (nanocausal/lora): the base model exactly at step 0, only the adapters train, adapters
round-trip with peft both ways, the merged folder loads in transformers, and every trainer
learns with it (SFT, DPO, GRPO) and resumes exactly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_hf_checkpoint, run_module, run_script, tiny_examples, write_jsonl
from nanocausal import checkpoint, lora, memory_plan
from nanocausal.checkpoint import load_model
from nanocausal.offline import PreferenceConfig, SFTConfig, train_offline
from nanocausal.rl import RLConfig, train_rl
from nanocausal.generate import generate_many
from nanocausal.tokenizer import Tokenizer
from rl_worker import on_token_ids

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def sft_adapter(tiny_chat_model, tmp_path_factory):
    """A rank-4 adapter trained by SFT for a few steps, so that B is not zero."""
    out = tmp_path_factory.mktemp("lora-sft")
    data = write_jsonl(out / "sft.jsonl", tiny_examples(8))
    result = train_offline(SFTConfig(model=str(tiny_chat_model), data=str(data), out_dir=str(out / "run"), device="cpu",
                                 steps=4, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, lora_rank=4,
                                 lora_alpha=8))
    return out / "run" / "checkpoint", result


@pytest.fixture
def qwen2_folder(tmp_path):
    make_hf_checkpoint(tmp_path / "qwen2", "qwen2")
    return tmp_path / "qwen2"


def ids_for(folder, n=2, length=12):
    vocab = load_model(folder).config.vocab_size
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_step_zero_is_the_base_model_exactly(qwen2_folder):
    model, ids = load_model(qwen2_folder), ids_for(qwen2_folder)
    with torch.no_grad():
        before = model(ids)
        lora.add_lora(model, rank=8, alpha=16)
        after = model(ids)
    assert torch.equal(before, after)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(8 * (m.in_features + m.out_features) for m in lora.target_layers(model, lora.TARGETS).values())


def test_only_the_adapters_train_and_the_checkpoint_is_a_peft_folder(tiny_chat_model, sft_adapter):
    folder, result = sft_adapter
    base = dict(load_model(tiny_chat_model).named_parameters())
    for name, p in result.model.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
        if ".lora_" not in name:
            assert torch.equal(p, base[name]), name  # the base is bit-identical after training
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "task_type")} == \
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
    assert sorted(config["target_modules"]) == sorted(lora.TARGETS)
    assert config["base_model_name_or_path"] == str(tiny_chat_model)
    assert not (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)


@pytest.fixture(scope="module", params=["sft", "dpo", "grpo"])
def trained_adapter(request, tiny_chat_model, sft_adapter, tmp_path_factory):
    """An adapter folder written by each kind of trainer after a few real steps (B is not zero)."""
    if request.param == "sft":
        return sft_adapter[0]
    out = tmp_path_factory.mktemp(f"lora-{request.param}")
    common = dict(model=str(tiny_chat_model), out_dir=str(out / "run"), device="cpu", steps=3, lr=1e-2,
                  warmup_steps=0, eval_every=0, lora_rank=4, lora_alpha=8)
    if request.param == "dpo":
        good, wrong = tiny_examples(4), tiny_examples(4, seed=100)
        data = write_jsonl(out / "dpo.jsonl", [{"prompt": g["prompt"], "chosen": g["completion"],
                                                "rejected": w["completion"]} for g, w in zip(good, wrong)])
        train_offline(PreferenceConfig(algo="dpo", data=str(data), batch_size=4, **common))
    else:
        tokenizer = Tokenizer.from_pretrained(tiny_chat_model)
        prompts = [{"prompt_ids": tokenizer.encode(e["prompt"])} for e in tiny_examples(4)]
        with pytest.MonkeyPatch.context() as patch:
            on_token_ids(patch.setattr, lambda example, ids: float(sum(ids) % 2), prompts)
            train_rl(RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=6, **common))
    return out / "run" / "checkpoint"


def test_our_adapter_in_peft_gives_our_logits(tiny_chat_model, trained_adapter):
    folder = trained_adapter
    ids = ids_for(tiny_chat_model)
    ours = load_model(folder)
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # a real update
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() <= 1e-5


def test_a_peft_adapter_loads_with_peft_logits(qwen2_folder, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen2_folder, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero: make the adapter matter
    theirs.save_pretrained(tmp_path / "adapter")
    ids = ids_for(qwen2_folder)
    ours = load_model(tmp_path / "adapter")
    with torch.no_grad():
        assert (ours(ids) - theirs.eval()(input_ids=ids).logits).abs().max() <= 1e-5


def test_the_merged_folder_loads_in_transformers_with_the_same_logits(tiny_chat_model, sft_adapter, tmp_path):
    folder, _ = sft_adapter
    out = run_module("nanocausal.lora", "merge", folder, tmp_path / "merged")
    assert "merged" in out.stdout
    ids = ids_for(tiny_chat_model)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (load_model(folder)(ids) - merged(ids).logits).abs().max() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_merged_and_unmerged_generation_give_the_same_tokens(tiny_chat_model, sft_adapter):
    folder, _ = sft_adapter
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    unmerged, merged = load_model(folder), lora.merge(load_model(folder))
    runs = [generate_many(m, prompts, 12, temperature=0, eos_token_ids=[]).tokens for m in (unmerged, merged)]
    assert torch.equal(*runs)


def test_the_generation_copy_has_the_adapted_models_logits_and_greedy_tokens(sft_adapter):
    """lora.merged_for_generation: a plain model (no adapters) with W + (alpha / r) B A. float32: logits
    within 1e-5 of the adapted model's and the same greedy tokens from generate_many (what RL
    rollouts and eval run). bf16 base: logits within 0.02 of the adapted model's (they reach ~1 here;
    measured 0.008, each as far from the float32 model's, 0.005: one bf16 rounding of each merged
    weight against the adapter path's rounding of its sum) and the same greedy tokens; the copy
    shares every bf16 tensor it does not change and allocates exactly merged_copy_bytes."""
    from nanocausal.model import Linear
    from nanocausal.generate import generate_many
    folder, _ = sft_adapter
    adapted = load_model(folder).eval()
    merged = lora.merged_for_generation(adapted)
    assert not lora.is_lora_model(merged) and not any(isinstance(m, Linear) and m.has_lora for m in merged.modules())
    ids = ids_for(folder)
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max() < 1e-5
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    runs = [generate_many(m, prompts, 12, slots=2, temperature=0, eos_token_ids=[]).tokens for m in (adapted, merged)]
    assert torch.equal(*runs)

    bf16 = load_model(folder, dtype=torch.bfloat16).eval()
    merged = lora.merged_for_generation(bf16)
    with torch.no_grad():
        logits = bf16(ids).float()
        assert (merged(ids).float() - logits).abs().max() < 0.02 < logits.abs().max()
    runs = [generate_many(m, prompts, 12, slots=2, temperature=0, eos_token_ids=[]).tokens for m in (bf16, merged)]
    assert torch.equal(*runs)
    own = {p.data_ptr() for p in bf16.parameters()}
    new = [p for p in merged.parameters() if p.data_ptr() not in own]
    assert sum(p.numel() * p.element_size() for p in new) == lora.merged_copy_bytes(bf16, torch.bfloat16) > 0
    adapted_layers = [m for m in bf16.modules() if isinstance(m, Linear) and m.has_lora]
    assert len(new) == len(adapted_layers)


def test_dpo_with_lora_lowers_the_loss_against_the_adapters_off_reference(tiny_chat_model, tmp_path):
    good, wrong = tiny_examples(8), tiny_examples(8, seed=100)
    pairs = [{"prompt": g["prompt"], "chosen": g["completion"], "rejected": w["completion"]} for g, w in zip(good, wrong)]
    data = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    result = train_offline(PreferenceConfig(algo="dpo", model=str(tiny_chat_model), data=str(data),
                                               out_dir=str(tmp_path / "out"), device="cpu", steps=40, batch_size=8,
                                               lr=1e-2, warmup_steps=0, eval_every=0, lora_rank=8))
    losses = [row["loss"] for row in result.history]
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)  # adapters off == adapters at B = 0: policy == reference
    assert losses[-1] < 0.4


def ends_with_three(example, completion_ids):
    return float(completion_ids[-1] == 3)


@pytest.fixture(scope="module")
def tiny_rl_model(tmp_path_factory):
    """The full-fine-tuning test's model, initialised 10x wider (initializer_range 0.2): with the
    default 0.02 its tied head's rows are so short that no hidden state the blocks produce can put
    more than ~0.2 on one token; full fine-tuning learns by growing the head, which LoRA (like
    full fine-tuning with a frozen head: measured, reward 0.06 -> 0.23 in 30 steps) cannot."""
    path = tmp_path_factory.mktemp("tiny-rl-lora")
    make_hf_checkpoint(path, "qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.2)
    return path


def rl_run(model, out_dir, **fields):
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(0, 16, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()}
               for _ in range(16)]
    config = RLConfig(**{"model": str(model), "out_dir": str(out_dir), "device": "cpu", "eval_every": 0,
                         "prompts_per_step": 8, "max_new_tokens": 4, "micro_batch_size": 16, "warmup_steps": 0,
                         "group_size": 8, "lora_rank": 8, **fields})
    with pytest.MonkeyPatch.context() as patch:
        on_token_ids(patch.setattr, ends_with_three, prompts)
        return train_rl(config)


def test_grpo_with_lora_learns_the_trivial_reward(tiny_rl_model, tmp_path):
    rows = rl_run(tiny_rl_model, tmp_path, steps=20, lr=1e-2).history
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-3:]) / 3
    assert first < 0.2 and last > 0.8, [round(r["reward"], 2) for r in rows]


def test_grpo_with_lora_resumes_exactly(tiny_rl_model, tmp_path, monkeypatch):
    flags = dict(steps=4, lr=1e-2, beta=0.1, save_every=2)  # beta: the adapters-off reference too
    whole = rl_run(tiny_rl_model, tmp_path / "a", **flags).model
    rl_run(tiny_rl_model, tmp_path / "b", **{**flags, "steps": 2})
    resumed = rl_run(tiny_rl_model, tmp_path / "b", **{**flags, "resume": True}).model
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_lora_errors_name_what_is_wrong(qwen2_folder, tmp_path):
    with pytest.raises(ValueError, match="no linear layer named 'qkv'"):
        lora.add_lora(load_model(qwen2_folder), 4, targets=("q_proj", "qkv"))
    out = run_script("train_sft.py", "--model", qwen2_folder, "--lora-alpha", 8, "--out-dir", tmp_path / "x",
                     "--device", "cpu", check=False)
    assert out.returncode == 1 and "--lora-alpha, --lora-dropout and --lora-targets need --lora-rank > 0" in out.stderr
    # An adapter whose base does not match: the tensor is named, with both shapes.
    make_hf_checkpoint(tmp_path / "other", "qwen2", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    model = lora.add_lora(load_model(tmp_path / "other"), 4)
    lora.save_adapter(model, tmp_path / "adapter", str(qwen2_folder))  # claims a base of another width
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor base_model\.model\.model\.layers\.\d+\.\S+"
                                         r"\.lora_[AB]\.weight has shape \(\d+, \d+\) but the base model expects"):
        load_model(tmp_path / "adapter")


def test_tokenizer_of_an_adapter_folder(sft_adapter, tiny_chat_model, tmp_path):
    folder = shutil.copytree(sft_adapter[0], tmp_path / "adapter")
    assert Tokenizer.from_pretrained(folder).encode("hello") == Tokenizer.from_pretrained(tiny_chat_model).encode("hello")
    os.remove(folder / "tokenizer.json")  # a bare peft adapter: the base's tokenizer
    assert Tokenizer.from_pretrained(folder).encode("hello") == Tokenizer.from_pretrained(tiny_chat_model).encode("hello")


def merge_cli(*args):
    from nanocausal.lora.__main__ import main
    return main(["merge", *map(str, args)])


def test_merge_overwrites_nothing_it_was_not_asked_to(sft_adapter, tiny_chat_model, tmp_path):
    folder = shutil.copytree(sft_adapter[0], tmp_path / "adapter")
    adapter_bytes = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    out = tmp_path / "merged"
    # a model folder (a run's checkpoint: weights and its trainer state) is not replaced without --overwrite
    shutil.copytree(tiny_chat_model, out)
    (out / "trainer_state.pt").write_bytes(b"the old run's optimiser")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(ValueError, match=f"{out} is not empty: pass --overwrite to replace it whole"):
        merge_cli(folder, out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    merge_cli(folder, out, "--overwrite")  # replaced whole: nothing of the old folder stays beside the new weights
    assert "trainer_state.pt" not in os.listdir(out) and not os.path.exists(f"{out}.tmp")
    ids = ids_for(tiny_chat_model)
    with torch.no_grad():
        assert (load_model(folder)(ids) - load_model(out)(ids)).abs().max() <= 1e-5
    # the adapter, its base, or a folder holding either: refused before anything is written
    for target, role in [(folder, "is the adapter"), (tmp_path / "." / "adapter", "is the adapter"),
                         (tiny_chat_model, "is its base model"), (tmp_path, "holds the adapter")]:
        with pytest.raises(ValueError, match=role):
            merge_cli(folder, target, "--overwrite")
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == adapter_bytes
    # a full model has nothing to merge
    with pytest.raises(ValueError, match=f"{tiny_chat_model} is not a LoRA adapter folder"):
        merge_cli(tiny_chat_model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_refused_merge_is_one_line(sft_adapter, tmp_path):
    out = subprocess.run([sys.executable, "-m", "nanocausal.lora", "merge", str(sft_adapter[0]), str(sft_adapter[0])],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "is the adapter, which the merge reads" in out.stderr


@pytest.mark.parametrize("base", ["itself", "cycle", None, 3])
def test_an_adapter_whose_base_is_not_a_model_is_one_line(sft_adapter, tmp_path, base):
    folder = shutil.copytree(sft_adapter[0], tmp_path / "a")
    other = shutil.copytree(sft_adapter[0], tmp_path / "b")
    for adapter in (folder, other):  # as a peft adapter from elsewhere: no manifest, no tokenizer of its own
        os.remove(adapter / checkpoint.MANIFEST)
        os.remove(adapter / "tokenizer.json")
    config = json.loads((folder / lora.ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = {"itself": str(folder), "cycle": str(other)}.get(base, base)
    (folder / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    (other / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(folder)}))
    expected = {"itself": "base_model_name_or_path names this adapter itself",
                "cycle": f"base_model_name_or_path names {other}, another LoRA adapter"}.get(
        base, f"base_model_name_or_path must name the base model \\(a folder or hub id\\), got {base}")
    # the tokenizer and the memory plan (--plan, and every run's check before loading) recursed
    for read in (load_model, checkpoint.fingerprint, Tokenizer.from_pretrained, memory_plan.meta_model):
        with pytest.raises(ValueError, match=expected) as refused:
            read(folder)
        assert "\n" not in str(refused.value)
