"""Continuous batching (nanocausal.refill) against the static batch (sampling.generate), a batch of
one, the training forward pass's log-probs, itself at other slot counts, and the edge cases of a
queue: more slots than prompts, one prompt, the end of the context, one new token, an EOS first."""
import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal import refill
from nanocausal.checkpoint import load_model
from nanocausal.data import pad_batch
from nanocausal.logprobs import token_logprobs
from nanocausal.refill import counter_uniform, generate_many, mix32, mul32, stream_key
from nanocausal.sampling import generate, sample_tokens

# initializer_range 0.2: peaked next-token distributions, so greedy continuations vary and a wrong
# cache column, position or mask shows up (as in test_sampling.py).
MODELS = {
    "qwen2": ("qwen2", dict(initializer_range=0.2)),
    "llama": ("llama", dict(initializer_range=0.2, tie_word_embeddings=False, num_key_value_heads=1)),
}
# Very different lengths: the long prompt spans several prefill chunks below.
PROMPTS = [[3, 17, 42, 5, 99, 7, 1], [200, 11], [8, 8, 9, 120, 33, 64, 2, 250, 19, 4, 77], [5],
           list(range(10, 70)), [90, 91, 92]]
EOS = list(range(0, 256, 9))  # about one id in nine ends a row: completions of many lengths
SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=50)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, (model_type, overrides) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_checkpoint(path, model_type, **overrides)
        out[name] = load_model(path)
    return out


def rows(out):
    """The completions of a Generation as lists, with their log-probs and stop reasons."""
    return [(tokens, out.logprobs[r, :len(tokens)], out.stop_reason[r]) for r, tokens in enumerate(out.completions())]


def assert_same(out, reference, atol=1e-5):
    """Same tokens, lengths and stop reasons row by row; log-probs within atol (float32, batch shapes differ)."""
    assert out.prompt_index.tolist() == reference.prompt_index.tolist()
    assert len(rows(out)) == len(rows(reference))
    for (tokens, logprobs, stop), (ref_tokens, ref_logprobs, ref_stop) in zip(rows(out), rows(reference)):
        assert tokens == ref_tokens and stop == ref_stop
        assert (logprobs - ref_logprobs).abs().max() <= atol


def teacher_forced_logprobs(model, prompts, out, temperature):
    """token_logprobs of the training forward pass on prompt + completion, at the completion."""
    index = out.prompt_index.tolist()
    sequences = [prompts[p] + c for p, c in zip(index, out.completions())]
    masks = [[0] * len(prompts[p]) + [1] * len(c) for p, c in zip(index, out.completions())]
    ids, attention, completion_mask = pad_batch(sequences, pad_id=0, masks=masks)
    with torch.no_grad():
        logprobs = token_logprobs(model, ids, attention, completion_mask, temperature=temperature)
    return [logprobs[r][completion_mask[r].bool()] for r in range(len(sequences))]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_alone_and_static_batch(models, name, monkeypatch):
    model = models[name]
    static = generate(model, PROMPTS, 20, temperature=0)
    alone = [generate(model, [p], 20, temperature=0) for p in PROMPTS]
    for p, one in zip(PROMPTS, alone):
        assert len(set(one.tokens[0].tolist())) > 3  # a continuation that exercises the cache
    for slots in (1, 3, 8):
        out = generate_many(model, PROMPTS, 20, slots=slots, temperature=0, prefill_chunk=16)
        assert_same(out, static)
        for r, one in enumerate(alone):
            assert out.tokens[r].tolist() == one.tokens[0].tolist()
            assert (out.logprobs[r] - one.logprobs[0]).abs().max() <= 1e-5
    # The CUDA graph's step (every column attended, scratch last), run eagerly here.
    monkeypatch.setattr(refill, "EAGER_ATTENDS_ALL_COLUMNS", True)
    assert_same(generate_many(model, PROMPTS, 20, slots=3, temperature=0), static)


def test_greedy_with_eos_equals_static_batch(models):
    model = models["qwen2"]
    static = generate(model, PROMPTS, 8, temperature=0, eos_token_ids=EOS, pad_token_id=255)
    assert len(set(static.lengths.tolist())) > 2 and "length" in static.stop_reason and "eos" in static.stop_reason
    for slots in (2, 5):
        out = generate_many(model, PROMPTS, 8, slots=slots, temperature=0, eos_token_ids=EOS, pad_token_id=255)
        assert_same(out, static)
        assert out.tokens.shape == static.tokens.shape and torch.equal(out.completion_mask, static.completion_mask)
        assert torch.equal(out.tokens, static.tokens)  # pad_token_id after each completion, as generate


def test_samples_identical_across_slot_counts(models, monkeypatch):
    model = models["qwen2"]
    kw = dict(num_samples=2, seed=3, eos_token_ids=EOS, **SAMPLING)
    one = generate_many(model, PROMPTS, 30, slots=2, **kw)  # one group at a time (slots >= num_samples)
    assert len(set(one.lengths.tolist())) > 3
    for slots in (3, 8, 64):
        assert_same(generate_many(model, PROMPTS, 30, slots=slots, **kw), one)
    monkeypatch.setattr(refill, "EAGER_ATTENDS_ALL_COLUMNS", True)
    assert_same(generate_many(model, PROMPTS, 30, slots=3, **kw), one)
    monkeypatch.undo()
    # A process given a share of the prompts, with their indices in the whole list, samples the same.
    share = generate_many(model, PROMPTS[3:], 30, slots=4, prompt_keys=range(3, len(PROMPTS)), **kw)
    assert share.completions() == one.completions()[6:]
    assert generate_many(model, PROMPTS, 30, slots=8, **{**kw, "seed": 4}).completions() != one.completions()
    single = dict(seed=3, eos_token_ids=EOS, **SAMPLING)  # one sample per prompt: slot counts 1, 3 and 8
    alone = generate_many(model, PROMPTS, 30, slots=1, **single)
    for slots in (3, 8):
        assert_same(generate_many(model, PROMPTS, 30, slots=slots, **single), alone)
    state = torch.get_rng_state()
    generate_many(model, PROMPTS, 4, slots=3)  # seed None: a random run seed, the global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_teacher_forcing(models, temperature):
    model = models["llama"]
    out = generate_many(model, PROMPTS, 20, slots=3, temperature=temperature, num_samples=2, seed=0,
                        eos_token_ids=[0, 1, 2, 3])
    assert not any(t.is_inference() for t in (out.tokens, out.logprobs, out.completion_mask))  # usable in training
    reference = teacher_forced_logprobs(model, PROMPTS, out, temperature if temperature > 0 else 1.0)
    for r, expected in enumerate(reference):
        n = int(out.lengths[r])
        # 2e-5: decode attention folds the query heads of a group (model.FOLD_DECODE_GQA), a
        # different float32 summation order than the training forward's
        assert (out.logprobs[r, :n] - expected).abs().max() <= 2e-5
        assert (out.logprobs[r, n:] == 0).all()
        assert out.completion_mask[r].tolist() == [1] * n + [0] * (out.tokens.shape[1] - n)


def test_groups_share_their_prompt(models):
    model = models["qwen2"]
    single = generate(model, PROMPTS, 12, temperature=0)
    for slots in (3, 4, 7):  # 4 and 7: not multiples of the group size, some slots wait for a group to fit
        greedy = generate_many(model, PROMPTS, 12, slots=slots, temperature=0, num_samples=3)
        assert greedy.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
        assert torch.equal(greedy.tokens, single.tokens.repeat_interleave(3, dim=0))
    sampled = generate_many(model, PROMPTS, 12, slots=4, temperature=1.0, num_samples=3, seed=0)
    for i in range(len(PROMPTS)):  # each sample of a group draws its own tokens, from the first one on
        group = sampled.tokens[3 * i:3 * i + 3].tolist()
        assert len({tuple(row) for row in group}) == 3


def test_edge_cases(models):
    model = models["qwen2"]  # context 256
    greedy = dict(temperature=0)
    # more slots than prompts, and one prompt
    assert_same(generate_many(model, PROMPTS[:2], 10, slots=16, **greedy), generate(model, PROMPTS[:2], 10, **greedy))
    assert_same(generate_many(model, PROMPTS[2:3], 10, slots=1, **greedy), generate(model, PROMPTS[2:3], 10, **greedy))
    # prompts that (nearly) fill the context: their new tokens are capped by what it leaves
    long = [list(range(250)), [7] * 255]
    out = generate_many(model, [PROMPTS[0]] + long, 20, slots=2, **greedy)
    assert out.lengths.tolist() == [20, 6, 1] and out.stop_reason == ["length"] * 3
    assert out.completions()[1] == generate(model, long[:1], 6, **greedy).completions()[0]
    assert out.completions()[2] == generate(model, long[1:], 1, **greedy).completions()[0]
    with pytest.raises(ValueError, match=r"prompts\[1\] has 256 tokens: it fills the model's context of 256"):
        generate_many(model, [[1], [2] * 256], 5)
    # one new token: every slot is done at admission
    assert_same(generate_many(model, PROMPTS, 1, slots=2, **greedy), generate(model, PROMPTS, 1, **greedy))
    sampled = generate_many(model, PROMPTS, 1, slots=2, num_samples=2, seed=1)
    assert sampled.tokens.shape == (12, 1) and sampled.lengths.tolist() == [1] * 12
    # a row whose first token is an EOS
    first = generate(model, PROMPTS, 1, **greedy).tokens[:, 0].tolist()
    eos = first[1]
    out = generate_many(model, PROMPTS, 15, slots=2, eos_token_ids=eos, **greedy)
    assert_same(out, generate(model, PROMPTS, 15, eos_token_ids=eos, **greedy))
    assert out.lengths[1] == 1 and out.stop_reason[1] == "eos" and out.tokens[1, 0] == eos
    # every row ends at its first token
    out = generate_many(model, PROMPTS, 15, slots=3, temperature=1.0, seed=0, eos_token_ids=range(256))
    assert out.lengths.tolist() == [1] * len(PROMPTS) and out.stop_reason == ["eos"] * len(PROMPTS)
    # vocab_size masks padded embedding rows (test_sampling.py's check, with refill)
    out = generate_many(model, PROMPTS, 30, slots=3, temperature=5.0, seed=0, vocab_size=200)
    assert (out.tokens < 200).all()


def test_bad_inputs_raise_clear_errors(models):
    model = models["qwen2"]
    with pytest.raises(ValueError, match=r"slots \(2\) must be >= num_samples \(3\)"):
        generate_many(model, PROMPTS, 5, slots=2, num_samples=3)
    with pytest.raises(ValueError, match="prompt_keys must hold one int"):
        generate_many(model, PROMPTS, 5, prompt_keys=[0, 1])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_many(model, PROMPTS, 0)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        generate_many(model, [[], [1]], 5)
    with pytest.raises(ValueError, match="non-empty list"):
        generate_many(model, [], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate_many(model, [[1]], 5, top_p=0.0)


# -----------------------------------------------------------------------------
# The counter-based random numbers


def test_mul32_and_mix32_are_exact_32_bit_arithmetic():
    values = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF]
    for x in values:
        for m in (0x7FEB352D, 0x846CA68B, 0x9E3779B9, 0xFFFFFFFF):
            assert mul32(x, m) == (x * m) % 2 ** 32
    tensor = torch.tensor(values)
    assert mix32(tensor).tolist() == [mix32(x) for x in values]  # the device op is the host op
    assert mix32(0) == 0 and len({mix32(x) for x in range(100_000)}) == 100_000  # a bijection
    assert len({stream_key(0, i, j) for i in range(1000) for j in range(8)}) == 8000


def test_counter_uniforms_are_uniform_and_independent():
    streams = torch.tensor([stream_key(7, i, j) for i in range(500) for j in range(4)])  # 2000 streams
    t = torch.arange(100)
    u = counter_uniform(streams[:, None].expand(-1, 100), t[None].expand(2000, -1))  # (2000, 100)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert ((counts - 10_000).abs() < 400).all()  # 4 standard deviations of a bin count (n = 200,000)
    for a, b in [(u[:, 1:], u[:, :-1]), (u[:1000], u[1000:])]:  # consecutive draws; different streams
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01
    # sampling with them reproduces the distribution (test_sampling.py's frequencies check)
    probs = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1])
    logits = probs.log()[None].expand(40000, 5).contiguous()
    keys = torch.tensor([stream_key(1, i, 0) for i in range(40000)])
    token, logprob = sample_tokens(logits, 1.0, 0, 1.0, uniform=counter_uniform(keys, torch.full_like(keys, 5)))
    assert (torch.bincount(token, minlength=5) / 40000 - probs).abs().max() < 0.01
    assert torch.allclose(logprob, probs.log()[token], atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_eager(models):
    model = models["qwen2"].cuda()
    try:
        for kw in (dict(temperature=0), dict(num_samples=2, seed=3, eos_token_ids=EOS, **SAMPLING)):
            eager = generate_many(model, PROMPTS, 40, slots=3, use_cuda_graph=False, **kw)
            graph = generate_many(model, PROMPTS, 40, slots=3, use_cuda_graph=True, **kw)
            assert_same(graph, eager, atol=1e-4)
        reference = teacher_forced_logprobs(model, PROMPTS, graph, SAMPLING["temperature"])
        for r, expected in enumerate(reference):
            assert (graph.logprobs[r, :int(graph.lengths[r])] - expected).abs().max() <= 1e-4
    finally:
        model.cpu()
