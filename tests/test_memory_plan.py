"""The memory plan (nanocausal/memory_plan.py, every trainer's --plan): exact parameter counts for
the real shapes in ../shared/configs, and its weights, gradients, optimizer and KV-cache bytes equal
to the real tensors' after a real step, float32 and bfloat16, full fine-tuning and LoRA."""
import json

import pytest
import torch

from conftest import make_hf_checkpoint, run_script
from nanocausal import checkpoint, generate, memory_plan, optimizer, training
from nanocausal.rl import RLConfig, train_rl
from rl_worker import on_token_ids

transformers = pytest.importorskip("transformers")
SHAPES = ("Qwen2.5-1.5B-Instruct", "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B",
          "DeepSeek-R1-Distill-Qwen-14B")


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_are_exact_for_the_real_shapes(shared_dir, shape):
    path = shared_dir / "configs" / f"{shape}.json"
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    out = run_script("train_rl.py", "--model", path, "--plan", "--json", "--dtype", "bfloat16")
    result = json.loads(out.stdout)
    assert result["parameters"] == reference.num_parameters()
    assert set(result) >= {"parameters", "trainable_parameters", "bytes", "total_bytes"}
    assert result["bytes"]["weights"] == 2 * reference.num_parameters()


def test_full_fine_tuning_of_14b_does_not_fit_141_gb_and_says_what_to_change(shared_dir):
    config = RLConfig(model=str(shared_dir / "configs" / "DeepSeek-R1-Distill-Qwen-14B.json"), dtype="bfloat16",
                      device="cuda", activation_checkpointing=True)
    full = memory_plan.plan(config, "grpo", gpu_memory_gib=141)
    assert not full["fits"] and full["advice"].startswith("--lora-rank")
    with_lora = memory_plan.plan(RLConfig(**{**config.__dict__, "lora_rank": 32, "prompts_per_step": 8}), "grpo",
                                 gpu_memory_gib=141)
    assert with_lora["fits"] and with_lora["trainable_parameters"] < full["parameters"] / 100


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_allocated_bytes(fn):
    """The most bytes that fn() held allocated at once on the CPU beyond what existed before it, from
    the allocator's own record (the profiler's memory events: every allocation and free)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype, lora_rank", [("float32", 0), ("bfloat16", 0), ("float32", 4), ("bfloat16", 4)])
def test_the_plan_equals_the_real_tensors_after_a_step(tmp_path, monkeypatch, dtype, lora_rank):
    make_hf_checkpoint(tmp_path / "model", "qwen2", vocab_size=64, tie_word_embeddings=False)
    prompt_tokens, prompts = 6, [{"prompt_ids": [1, 2, 3, 4, 5, i]} for i in range(4)]
    config = RLConfig(model=str(tmp_path / "model"), out_dir=str(tmp_path / "out"), device="cpu", dtype=dtype,
                      steps=1, prompts_per_step=4, group_size=2, max_new_tokens=5, micro_batch_size=8, lr=1e-3,
                      warmup_steps=0, eval_every=0, lora_rank=lora_rank, beta=0.0)
    caches = []
    real_init = generate.Slots.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(tensor_bytes(t for pair in self.kv_cache for t in pair))

    monkeypatch.setattr(generate.Slots, "__init__", recording)
    on_token_ids(monkeypatch.setattr, lambda example, ids: float(sum(ids) % 2), prompts)
    model = train_rl(config).model
    planned = memory_plan.plan(config, "grpo", prompt_tokens=prompt_tokens)["bytes"]

    assert planned["weights"] == tensor_bytes(model.parameters())
    assert planned["kv_cache"] == caches[0]
    state = torch.load(tmp_path / "out" / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert planned["optimizer"] == tensor_bytes(t for s in state.values() for t in s.values() if torch.is_tensor(t))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model(torch.tensor([[1, 2, 3]])).float().sum().backward()
    assert planned["gradients"] == tensor_bytes(p.grad for p in trainable)
    # the step's temporaries: torch's single-tensor AdamW (float32 trainables on CPU), or ours in chunks
    # (made smaller than the largest tensor here, so that chunking is what is measured)
    monkeypatch.setattr(optimizer.AdamW, "CHUNK", 1000)
    adamw = training.make_optimizer(model, lr=1e-3)
    adamw.step()  # (allocates the state)
    planned = memory_plan.plan(config, "grpo", prompt_tokens=prompt_tokens)["bytes"]
    peak = peak_allocated_bytes(adamw.step)  # (+ 12 bytes: the 0-dim scalar tensors of a step)
    assert planned["optimizer_temporaries"] <= peak <= planned["optimizer_temporaries"] + 64
    if dtype == "bfloat16" and not lora_rank:
        assert planned["optimizer_temporaries"] == 2 * 4 * 1000
    assert planned["reference"] == 0 and planned["value_model"] == 0
    if dtype == "bfloat16" and not lora_rank:  # train_rl --dtype bfloat16 on CPU: finite, saved in bf16
        saved = checkpoint.load_model(tmp_path / "out" / "checkpoint", dtype=None)
        assert json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())["torch_dtype"] == "bfloat16"
        assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_the_plan_per_gpu_of_a_torchrun_run(shared_dir):
    """--plan-gpus 8: FSDP divides weights, gradients, optimizer by 8; each rank decodes its share of the
    prompts with a full bf16 copy of the weights that lives in the generation phase only; the gathered
    units (root + two blocks, bf16) are counted in training."""
    config = RLConfig(model=str(shared_dir / "configs" / "DeepSeek-R1-Distill-Qwen-14B.json"), device="cuda",
                      activation_checkpointing=True, prompts_per_step=64, group_size=8, max_new_tokens=4096)
    one, eight = memory_plan.plan(config, "grpo", gpu_memory_gib=80), memory_plan.plan(config, "grpo", gpu_memory_gib=80, gpus=8)
    for name in ("weights", "gradients", "optimizer"):
        assert eight["bytes"][name] == one["bytes"][name] // 8
    assert eight["bytes"]["kv_cache"] * 8 == one["bytes"]["kv_cache"]
    P = one["parameters"]
    assert eight["bytes"]["rollout_copy"] == one["bytes"]["rollout_copy"] == 2 * P
    with torch.device("meta"):
        model = checkpoint.Transformer(checkpoint.read_config(config.model))
    block = sum(p.numel() for p in model.layers[0].parameters())
    assert eight["bytes"]["fsdp_unsharded"] == 2 * (P - len(model.layers) * block + 2 * block)
    b = eight["bytes"]
    assert eight["phases"]["training"] == (b["weights"] + b["optimizer"] + b["gradients"] + b["fsdp_unsharded"]
                                           + b["activations"] + b["logits_chunk"])
    assert eight["phases"]["generation"] == (b["weights"] + b["optimizer"] + b["rollout_copy"] + b["kv_cache"]
                                             + b["prefill_cache"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_rollouts_plan_the_merged_copy_when_it_fits(tmp_path, dtype):
    """LoRA GRPO on one GPU: the rollouts' copy (lora.merged_for_generation, bf16) is planned at the
    bytes the real copy allocates, in the generation phase only; when it would not fit, the plan
    says so (merge_lora False) and keeps today's rollout copy (none for a bf16 base)."""
    from nanocausal import lora
    make_hf_checkpoint(tmp_path / "model", "qwen2", vocab_size=64, tie_word_embeddings=False)
    config = RLConfig(model=str(tmp_path / "model"), device="cuda", dtype=dtype, lora_rank=4, prompts_per_step=4,
                      group_size=2, max_new_tokens=5)
    result = memory_plan.plan(config, "grpo", prompt_tokens=6, gpu_memory_gib=80)
    model = lora.add_lora(checkpoint.load_model(tmp_path / "model", dtype=getattr(torch, dtype)), 4)
    own = {p.data_ptr() for p in model.parameters()}
    copy = lora.merged_for_generation(model, torch.bfloat16)
    b = result["bytes"]
    assert result["merge_lora"] and b["rollout_copy"] == tensor_bytes(p for p in copy.parameters() if p.data_ptr() not in own)
    assert result["phases"]["generation"] == (b["weights"] + b["optimizer"] + b["rollout_copy"] + b["kv_cache"]
                                              + b["prefill_cache"])
    assert result["phases"]["training"] == b["weights"] + b["optimizer"] + b["gradients"] + b["activations"] + b["logits_chunk"]
    tight = memory_plan.plan(config, "grpo", prompt_tokens=6, gpu_memory_gib=(result["phases"]["generation"] - 1) / 2**30)
    assert not tight["merge_lora"]
    assert tight["bytes"]["rollout_copy"] == (0 if dtype == "bfloat16" else 2 * tight["parameters"])
