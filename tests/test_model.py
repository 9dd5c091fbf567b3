"""The hand-written transformer against transformers, the reference, on tiny random and real checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "qwen2-bias-tied": ("qwen2", {}),
    "qwen2-untied-mha": ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "qwen3-head-dim": ("qwen3", dict(head_dim=32, num_key_value_heads=1)),
    "llama-untied-llama3-rope": ("llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-bias-head-dim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=8, num_attention_heads=8, num_key_value_heads=2)),
}


def reference_logits(hf_model, ids, attention_mask=None):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    model_type, overrides = CASES[case]
    hf_model = make_hf_checkpoint(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, 37, 256)
    assert (ours - reference_logits(hf_model, ids)).abs().max() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    hf_model = make_hf_checkpoint(tmp_path / "src", "qwen2")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) >= 3
    model = load_model(tmp_path / "sharded")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (model(ids) - reference_logits(hf_model, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["qwen2-bias-tied", "llama-untied-llama3-rope"])
def test_left_padded_batch_equals_unpadded_rows(tmp_path, case):
    model_type, overrides = CASES[case]
    make_hf_checkpoint(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    rows = [torch.randint(0, 256, (n,)) for n in (12, 5, 9)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (batched[i, T - len(r):] - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("autocast", [False, True])
def test_the_attention_mask_is_built_once_as_an_additive_float_mask(tmp_path, autocast):
    """Every layer gets the same mask tensor (built once per forward, not converted per layer):
    in the compute dtype, 0 where a query sees a key (causal, not padding, or itself) and -inf elsewhere."""
    make_hf_checkpoint(tmp_path, "qwen2")
    model = load_model(tmp_path)
    masks = []
    for block in model.layers:
        block.self_attn.register_forward_hook(lambda m, args, out: masks.append(args[3]))
    ids, padding = torch.randint(0, 256, (2, 5)), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(ids, attention_mask=padding)
    assert len(masks) == len(model.layers) and all(m is masks[0] for m in masks)
    mask = masks[0]
    assert mask.dtype == (torch.bfloat16 if autocast else torch.float32) and mask.shape == (2, 1, 5, 5)
    visible = torch.tril(torch.ones(5, 5, dtype=torch.bool)) & padding.bool()[:, None, :] | torch.eye(5, dtype=torch.bool)
    assert torch.equal(mask[:, 0], torch.where(visible, 0.0, float("-inf")).to(mask.dtype))


def test_save_model_loads_in_transformers(tmp_path):
    make_hf_checkpoint(tmp_path / "src", "qwen3", tie_word_embeddings=False)
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", max_shard_bytes=60_000)  # sharded
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (model(ids) - reference_logits(hf_model, ids)).abs().max() <= 1e-5
    save_model(model, tmp_path / "out")  # re-save as one file: stale shards must go
    assert sorted(f for f in os.listdir(tmp_path / "out") if "safetensors" in f) == ["model.safetensors"]
    reloaded = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_bfloat16_loading(tmp_path):
    hf_model = make_hf_checkpoint(tmp_path, "qwen2")
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ours, ref = model(ids).float(), reference_logits(hf_model, ids)
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()


# --- bad input: one clear line each ------------------------------------------------------------


def test_unknown_model_type(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path)


def test_rope_settings_top_level_or_nested_and_the_default_type_is_plain_rope():
    from nanocausal.model import ModelConfig

    shape = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2)
    read = lambda **rope: ModelConfig.from_dict({**shape, **rope})
    nested = read(rope_parameters={"rope_theta": 5.0, "rope_type": "linear", "factor": 2.0})
    assert (nested.rope_theta, nested.rope_scaling) == (5.0, {"rope_type": "linear", "factor": 2.0})
    assert read(rope_scaling={"type": "linear", "factor": 4.0}).rope_scaling == {"type": "linear", "factor": 4.0,
                                                                                 "rope_type": "linear"}
    assert read(rope_parameters={"rope_theta": 5.0, "rope_type": "default"}).rope_scaling is None
    assert read(rope_scaling=None).rope_scaling is None and read().rope_theta == 10000.0
    with pytest.raises(ValueError, match="config.json: rope_scaling type 'yarn' is not supported"):
        read(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_checkpoint(tmp_path, "qwen2")
    file = tmp_path / "model.safetensors"
    original = load_file(file)

    state = dict(original)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file)
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(128, 64\)\)"):
        load_model(tmp_path)

    state = dict(original, **{"model.layers.0.extra.weight": torch.zeros(3)})
    save_file(state, file)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load_model(tmp_path)

    state = dict(original, **{"model.norm.weight": torch.zeros(65)})
    save_file(state, file)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(65,\) but the config expects \(64,\)"):
        load_model(tmp_path)


def test_truncated_and_corrupted_files(tmp_path):
    make_hf_checkpoint(tmp_path, "qwen2")
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_model(tmp_path)
    file.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint: it has no config.json"):
        load_model(tmp_path)
    make_hf_checkpoint(tmp_path, "qwen2")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub id"):
        load_model(tmp_path / "does-not-exist")


# --- a real pretrained model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    return load_model(smollm2_path), hf_model, tok


def test_smollm2_logits_and_greedy_tokens(smollm2):
    model, hf_model, tok = smollm2
    messages = [{"role": "user", "content": "If smoking causes cancer, does stopping smoking lower the risk?"}]
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        assert (model(ids) - reference_logits(hf_model, ids)).abs().max() <= 1e-3
        ours, ref = ids, ids
        for _ in range(32):  # plain argmax loops, no cache, in both
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
            ref = torch.cat([ref, reference_logits(hf_model, ref)[:, -1:].argmax(-1)], dim=1)
    assert ours.tolist() == ref.tolist()


def test_smollm2_loading_peak_memory(smollm2_path):
    """Loading must not hold two copies of the weights: peak RSS grows by <= 1.3x the file size."""
    code = (
        "import resource, sys, torch\n"
        "from nanocausal.checkpoint import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "load_model(sys.argv[1])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_path)], capture_output=True, text=True, check=True)
    file_size = os.path.getsize(smollm2_path / "model.safetensors")
    assert int(out.stdout.strip()) <= 1.3 * file_size
