"""The one-GPU path checked on CPU (issue 14): bf16 generation with float32 master weights reads
bf16 copies of the weights (no per-step casts), the KV cache and the rotary tables are in the
compute dtype, one-token GQA decode folds query heads into the query dimension with the same
logits, padded vocabularies are never sampled, and the memory plan counts the copies."""
from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import make_hf_checkpoint
import torch.nn.functional as F

from nanocausal import generate
from nanocausal import model as model_module
from nanocausal.checkpoint import load_model
from nanocausal.generate import generate_many

PROMPTS = [[3, 17, 42, 5, 99, 7, 1], [200, 11], [8, 8, 9, 120, 33]]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_hf_checkpoint(path, "qwen2", initializer_range=0.2)  # GQA: 4 query heads, 2 key/value heads
    return path


class CountFloat32ParameterReads(TorchDispatchMode):
    """Counts the aten ops (casts: aten.to / _to_copy, copies, matmuls: anything but detach and
    empty_like, which read no data) that read the storage of a float32 parameter of `model`."""

    def __init__(self, model):
        super().__init__()
        self.pointers = {p.data_ptr() for p in model.parameters() if p.dtype == torch.float32}
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.empty_like.default):
            return func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float32 and t.untyped_storage().data_ptr() in self.pointers for t in tensors):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def float32_reads(model, new_tokens):
    with CountFloat32ParameterReads(model) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        generate_many(model, PROMPTS, new_tokens, temperature=0)
    return counter.reads


def test_bf16_decode_reads_no_float32_weight(tiny, monkeypatch):
    model = load_model(tiny)  # float32 master weights, bf16 autocast: the standard mixed precision
    # the CUDA path: Linear reads its weight itself (no CPU transposed copy)
    monkeypatch.setattr(generate, "cpu_weight_layout", lambda model: nullcontext())
    parameters = len(list(model.parameters()))
    short, long = float32_reads(model, 2), float32_reads(model, 12)
    # one read per parameter per call (the in-place copy_ that refreshes its bf16 copy), none per decode step
    assert short == long == parameters
    copies = model.compute_dtype_copies
    addresses = {id(p): copy.data_ptr() for id_, (p, copy) in copies.items()}
    float32_reads(model, 2)
    assert {id(p): copy.data_ptr() for id_, (p, copy) in copies.items()} == addresses  # same buffers: graphs stay valid
    assert all(copy.dtype == torch.bfloat16 for _, copy in copies.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the parameters are put back

    # without the copies autocast casts every weight at every step: the count grows with the tokens
    monkeypatch.setattr(generate, "compute_dtype_weights", lambda model: nullcontext())
    assert float32_reads(model, 12) > float32_reads(model, 2) > parameters


def test_copies_follow_an_optimiser_step(tiny):
    model = load_model(tiny)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = generate_many(model, PROMPTS[:1], 6, temperature=0).tokens[0].tolist()
        with torch.no_grad():
            model.lm_head.weight[before[0]] -= 100.0  # in place, as AdamW updates: the first token cannot win
        after = generate_many(model, PROMPTS[:1], 6, temperature=0).tokens[0].tolist()
    assert after[0] != before[0]


@pytest.mark.parametrize("weights", ["float32 + bf16 autocast", "bfloat16"])
def test_kv_cache_and_rope_are_in_the_compute_dtype(tiny, weights, monkeypatch):
    model = load_model(tiny, dtype=torch.float32 if weights.startswith("float32") else torch.bfloat16)
    caches = []
    real_init = generate.Slots.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.extend(t for pair in self.kv_cache for t in pair)
    monkeypatch.setattr(generate.Slots, "__init__", recording)
    queries = []
    model.layers[0].self_attn.register_forward_hook(lambda m, args, out: queries.append(args[1].dtype))  # cos
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights.startswith("float32")):
        generate_many(model, PROMPTS, 3, temperature=0)
    assert len(caches) == 2 * model.config.num_hidden_layers
    assert all(t.dtype == torch.bfloat16 for t in caches)
    assert queries and set(queries) == {torch.bfloat16}


def test_folded_gqa_decode_equals_enable_gqa(tiny, monkeypatch):
    model = load_model(tiny)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    calls = []
    real = model_module.Attention.folded_decode_attention
    monkeypatch.setattr(model_module.Attention, "folded_decode_attention",
                        lambda self, *a: calls.append(1) or real(self, *a))
    folded = generate_many(model, PROMPTS, 16, temperature=0)
    assert calls  # the decode steps took the folded path
    monkeypatch.setattr(model_module.Attention, "folded_decode_attention",  # SDPA's own grouped-query path
                        lambda self, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    reference = generate_many(model, PROMPTS, 16, temperature=0)
    assert torch.equal(folded.tokens, reference.tokens)
    assert (folded.logprobs - reference.logprobs).abs().max() <= 1e-5


def test_padded_vocabulary_is_never_sampled(tiny):
    """A checkpoint whose embedding is padded beyond the tokenizer (Qwen: 151,665 ids in 151,936
    rows): with vocab_size given, the padded ids are never sampled, even when they are the most likely."""
    model = load_model(tiny)
    with torch.no_grad():
        model.lm_head.weight[200:] = model.lm_head.weight[200:] * 0 + 1.0  # tied: padded ids dominate
    free = generate_many(model, PROMPTS, 8, temperature=1.0, seed=0)
    assert (free.tokens >= 200).float().mean() > 0.5
    out = generate_many(model, PROMPTS, 8, temperature=1.0, seed=0, vocab_size=200)
    assert (out.tokens < 200).all()


def test_bucket_width_arithmetic(monkeypatch):
    monkeypatch.setattr(generate, "GRAPH_BUCKET", 512)
    assert [generate.bucket_width(n, 1200) for n in (1, 511, 512, 513, 1024, 1025, 1200)] == \
        [512, 512, 512, 1024, 1024, 1200, 1200]


def test_graph_bucket_widths_compute_the_same_tokens(tiny, monkeypatch):
    """The CUDA graphs' widths (widths="bucket", a bucket of 4 slots here: many switches), run eagerly on CPU."""
    model = load_model(tiny)
    kw = dict(temperature=0.8, num_samples=2, seed=1, eos_token_ids=list(range(0, 256, 9)))
    exact = generate_many(model, PROMPTS, 20, **kw)
    widths = []
    real_step = generate.Slots.step
    monkeypatch.setattr(generate, "GRAPH_BUCKET", 4)
    monkeypatch.setattr(generate.Slots, "step", lambda self, width: widths.append(width) or real_step(self, width))
    bucketed = generate_many(model, PROMPTS, 20, widths="bucket", **kw)
    assert torch.equal(bucketed.tokens, exact.tokens)
    assert (bucketed.logprobs - exact.logprobs).abs().max() <= 1e-5
    assert len(set(widths)) > 3 and all(w % 4 == 0 or w == max(widths) for w in widths)


def test_the_one_micro_batch_cutter_by_hand():
    """data.cut, which the offline trainers and the RL rollouts both use: in order, at most `size`
    items, at most max_tokens padded tokens (here rows x the longest), an item over the budget alone."""
    from nanocausal.data import cut
    lengths = [2, 2, 3, 5, 5, 9, 20]
    padded = lambda chunk: len(chunk) * max(lengths[i] for i in chunk)  # noqa: E731
    assert cut(range(6), 3) == [[0, 1, 2], [3, 4, 5]]
    assert cut(range(7), 3, 10, padded) == [[0, 1, 2], [3, 4], [5], [6]]  # 2 x 5 = 10 fits, 3 x 9 does not
    assert cut([6, 0], 3, 10, padded) == [[6], [0]] and cut([], 3) == []


def test_micro_batches_respect_the_token_budget_and_leave_the_gradient_unchanged(tiny, monkeypatch):
    from nanocausal import rl, rollout
    model = load_model(tiny)
    prompts = [[5] * n for n in (3, 9, 4, 14, 6, 2)]
    batch = rollout.rollout(model, prompts, 2, 10, 1.0, 1.0, 0, 0, list(range(0, 256, 7)), 0)
    batch.advantages = torch.randn(len(prompts) * 2, generator=torch.Generator().manual_seed(0))
    last = batch.completion_mask.cumsum(1).argmax(1)
    assert len(set(last.tolist())) > 4  # lengths differ: the budget matters
    budget = 48
    seen = []
    for index, mb in batch.micro_batches(range(12), 5, budget):
        seen += index.tolist()
        assert len(index) <= 5 and (mb.input_ids.numel() <= budget or len(index) == 1)
        assert torch.equal(mb.advantages, batch.advantages[index])
        assert mb.completions == [batch.completions[r] for r in index]
    assert sorted(seen) == list(range(12))

    def gradient(**fields):
        config = rl.RLConfig(model=str(tiny), device="cpu", group_size=2, max_new_tokens=10, **fields)
        grads = {}

        def record(optimizer, clip):
            grads.update({id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"]})
            optimizer.zero_grad(set_to_none=True)
            return torch.tensor(0.0)
        monkeypatch.setattr(rl.training, "optimizer_step", record)
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics, _ = rl.update(model.train(), rl.GRPO(config), optimizer, batch, config, 0)
        return grads, metrics

    by_rows, metrics_rows = gradient(micro_batch_size=16)
    by_tokens, metrics_tokens = gradient(micro_batch_size=16, micro_batch_tokens=budget)
    assert by_rows.keys() == by_tokens.keys()
    for key in by_rows:
        assert torch.allclose(by_rows[key], by_tokens[key], atol=1e-6, rtol=1e-4)
    assert abs(metrics_rows["policy_loss"] - metrics_tokens["policy_loss"]) < 1e-6


def test_the_plan_counts_the_rollout_copy_and_a_bf16_cache(tiny, monkeypatch):
    """The plan of a CUDA run (float32 weights, bf16 autocast) against the real tensors of the same
    generation under CPU bf16 autocast: the bf16 weight copies and the bf16 KV cache."""
    from nanocausal import memory_plan
    from nanocausal.rl import RLConfig
    model = load_model(tiny)
    caches = []
    real_init = generate.Slots.__init__  # the rollouts' sampler

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(sum(t.numel() * t.element_size() for pair in self.kv_cache for t in pair))
    monkeypatch.setattr(generate.Slots, "__init__", recording)
    prompts = [[1, 2, 3, 4, 5, i] for i in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate_many(model, prompts, 5, slots=6, num_samples=2, seed=0)
    config = RLConfig(model=str(tiny), device="cuda", dtype="float32", prompts_per_step=3, group_size=2,
                      max_new_tokens=5)
    planned = memory_plan.plan(config, "grpo", prompt_tokens=6, gpu_memory_gib=80)["bytes"]
    assert planned["rollout_copy"] == sum(c.numel() * c.element_size() for _, c in model.compute_dtype_copies.values())
    assert planned["kv_cache"] == caches[0]
    bf16 = memory_plan.plan(RLConfig(**{**config.__dict__, "dtype": "bfloat16"}), "grpo", prompt_tokens=6,
                            gpu_memory_gib=80)["bytes"]
    assert bf16["rollout_copy"] == 0 and bf16["kv_cache"] == caches[0]


def test_offline_micro_batches_by_tokens_give_the_same_gradient(tiny):
    """SFT: micro-batches cut at a token budget hold at most that many padded tokens, and the step's
    loss and gradient equal those of one micro-batch of every example."""
    from nanocausal import data
    from nanocausal.offline import sft_backward
    model = load_model(tiny).train()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (5, 17, 9, 30, 3, 12, 22, 7):
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        rows.append({"ids": ids, "completion_mask": [0] * (n // 2) + [1] * (n - n // 2)})
    indices = list(range(len(rows)))
    cut = data.micro_batches(rows, indices, data.collate_sft, 0, 8, "cpu", max_tokens=40)
    assert len(cut) > 3 and sum(len(b["indices"]) for b in cut) == len(rows)
    assert all(b["input_ids"].numel() <= 40 or len(b["indices"]) == 1 for b in cut)

    def gradient(batches):
        model.zero_grad(set_to_none=True)
        loss = sft_backward(model, batches, "cpu")["loss"]
        return loss, [p.grad.clone() for p in model.parameters()]
    loss_cut, grads_cut = gradient(cut)
    loss_one, grads_one = gradient(data.micro_batches(rows, indices, data.collate_sft, 0, 8, "cpu"))
    assert abs(float(loss_cut) - float(loss_one)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads_cut, grads_one))
