"""The sampler against references: transformers' generate and a cache-free greedy loop, the
training forward pass's log-probs, and exact top-k / top-p supports on a known distribution."""
import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal.checkpoint import load_model
from nanocausal.sampling import filter_logits, generate, sample_tokens
from nanocausal.data import pad_batch
from nanocausal.logprobs import token_logprobs

transformers = pytest.importorskip("transformers")

# initializer_range 0.2 (not 0.02): a random model with peaked next-token distributions, so greedy
# continuations vary instead of repeating one token, and a wrong cache or position shows up.
MODELS = {
    "qwen2": ("qwen2", dict(initializer_range=0.2)),
    "llama": ("llama", dict(initializer_range=0.2, tie_word_embeddings=False, num_key_value_heads=1)),
}
PROMPTS = [[3, 17, 42, 5, 99, 7, 1], [200, 11], [8, 8, 9, 120, 33, 64, 2, 250, 19, 4, 77], [5]]


def tiny_model(tmp_path, name):
    model_type, overrides = MODELS[name]
    hf_model = make_hf_checkpoint(tmp_path, model_type, **overrides)
    return load_model(tmp_path), hf_model


def greedy_by_recompute(model, prompt, new_tokens):
    """The definition of greedy decoding: re-run the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_greedy(hf_model, prompts, new_tokens):
    """transformers' greedy generate on a left-padded batch: (len(prompts), new_tokens) ids."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, T:]


@pytest.fixture
def one_thread():
    """Decoding tiny batches gains nothing from a second thread, and on a shared, oversubscribed CI
    machine OpenMP's barriers made this test 10x slower with two (300 s instead of 26 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_recompute_and_transformers(tmp_path, name, one_thread):
    model, hf_model = tiny_model(tmp_path, name)
    out = generate(model, PROMPTS, 24, temperature=0)  # one left-padded batch of unequal prompts
    assert out.tokens.shape == (len(PROMPTS), 24) and out.stop_reason == ["length"] * len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        expected = greedy_by_recompute(model, prompt, 24)
        assert len(set(expected)) > 3  # a continuation that exercises the cache, not one repeated id
        assert out.tokens[i].tolist() == expected
        assert out.tokens[i].tolist() == hf_greedy(hf_model, [prompt], 24)[0].tolist()  # unpadded reference


def test_greedy_smollm2_matches_transformers(smollm2_path, one_thread):
    model = load_model(smollm2_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))
    texts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
             "If it rains, the grass gets wet. The grass is wet, so"]
    prompts = [tokenizer.encode(text).ids for text in texts]
    out = generate(model, prompts, 64, temperature=0)
    assert torch.equal(out.tokens, hf_greedy(hf_model, prompts, 64))


def test_group_samples_share_the_prompt(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")
    greedy = generate(model, PROMPTS, 12, temperature=0, num_samples=3)
    assert greedy.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
    single = generate(model, PROMPTS, 12, temperature=0)
    assert torch.equal(greedy.tokens, single.tokens.repeat_interleave(3, dim=0))
    sampled = generate(model, PROMPTS, 12, temperature=1.0, num_samples=3, seed=0)
    for i in range(len(PROMPTS)):  # each sample of a group draws its own tokens, from the first one on
        group = sampled.tokens[3 * i:3 * i + 3].tolist()
        assert len({tuple(row) for row in group}) == 3


def test_seed_reproduces_samples(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")
    args = dict(temperature=0.9, top_p=0.95, top_k=50, num_samples=2)
    a = generate(model, PROMPTS, 16, seed=123, **args)
    b = generate(model, PROMPTS, 16, seed=123, **args)
    c = generate(model, PROMPTS, 16, seed=124, **args)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    state = torch.get_rng_state()
    generate(model, PROMPTS, 4, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def training_logprobs(model, prompts, out, temperature):
    """token_logprobs of the training forward pass on prompt + completion, at the completion."""
    rows = [prompts[p] + c for p, c in zip(out.prompt_index.tolist(), out.completions())]
    masks = [[0] * len(prompts[p]) + [1] * len(c) for p, c in zip(out.prompt_index.tolist(), out.completions())]
    ids, attention, completion_mask = pad_batch(rows, pad_id=0, masks=masks)
    with torch.no_grad():
        logprobs = token_logprobs(model, ids, attention, completion_mask, temperature=temperature)
    return [logprobs[r][completion_mask[r].bool()] for r in range(len(rows))]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_training_forward(tmp_path, temperature):
    model, _ = tiny_model(tmp_path, "llama")
    out = generate(model, PROMPTS, 20, temperature=temperature, num_samples=2, seed=0, eos_token_ids=[0, 1, 2, 3])
    assert not any(t.is_inference() for t in (out.tokens, out.logprobs, out.completion_mask))  # usable in training
    reference = training_logprobs(model, PROMPTS, out, temperature if temperature > 0 else 1.0)
    for r, expected in enumerate(reference):
        n = int(out.lengths[r])
        assert (out.logprobs[r, :n] - expected).abs().max() <= 1e-4
        assert (out.logprobs[r, n:] == 0).all()


def test_eos_stops_rows_independently(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")
    eos = list(range(0, 256, 9))  # about one id in nine ends a row: rows stop at different steps
    free = generate(model, PROMPTS, 30, temperature=1.0, num_samples=2, seed=7)  # no EOS: the same draws
    out = generate(model, PROMPTS, 30, temperature=1.0, num_samples=2, seed=7, eos_token_ids=eos, pad_token_id=255)
    lengths = []
    for r, row in enumerate(free.tokens.tolist()):
        first_eos = next((t for t, token in enumerate(row) if token in eos), None)
        n = 30 if first_eos is None else first_eos + 1  # the EOS belongs to the completion
        lengths.append(n)
        assert out.stop_reason[r] == ("length" if first_eos is None else "eos")
        assert out.tokens[r, :n].tolist() == row[:n]
        assert out.tokens[r, n:].eq(255).all()
        assert out.completion_mask[r].tolist() == [1] * n + [0] * (out.tokens.shape[1] - n)
        assert torch.equal(out.logprobs[r, :n], free.logprobs[r, :n]) and out.logprobs[r, n:].eq(0).all()
    assert out.lengths.tolist() == lengths and len(set(lengths)) > 2 and "eos" in out.stop_reason
    assert out.tokens.shape[1] == max(lengths)
    done = generate(model, PROMPTS, 200, temperature=1.0, seed=7, eos_token_ids=list(range(128)))
    assert done.stop_reason == ["eos"] * len(PROMPTS) and done.tokens.shape[1] < 40  # stopped early, not after 200


def test_filter_logits_support():
    probs = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1])
    logits = probs.log()[None]

    def support(**kw):
        return set(torch.nonzero(filter_logits(logits, **kw)[0].isfinite()).flatten().tolist())

    assert support() == {0, 1, 2, 3, 4}
    assert support(top_k=1) == {1} and support(top_k=2) == {1, 3} and support(top_k=4) == {0, 1, 3, 4}
    assert support(top_p=0.3) == {1}  # 0.4 alone reaches 0.3
    assert support(top_p=0.5) == {1, 3}  # 0.4 < 0.5, then 0.4 + 0.3 reaches it
    assert support(top_p=0.75) == {0, 1, 3}
    assert support(top_p=0.99) == {0, 1, 2, 3, 4}
    # top-p applies to the top-k-renormalised distribution: 0.4, 0.3, 0.15 become .47, .35, .18
    assert support(top_k=3, top_p=0.8) == {1, 3}
    assert support(top_k=3, top_p=0.85) == {0, 1, 3}


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(0, 0.9), (40, 1.0), (40, 0.7), (0, 0.2)]:
        expected = logits.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(filter_logits(logits, top_k, top_p).isfinite(), expected.isfinite())


def test_sampled_frequencies_and_logprobs():
    probs = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1])
    logits = probs.log()[None].expand(40000, 5).contiguous()
    generator = torch.Generator().manual_seed(0)
    for kw, kept in [(dict(top_k=0, top_p=1.0), [0, 1, 2, 3, 4]), (dict(top_k=3, top_p=1.0), [0, 1, 3]),
                     (dict(top_k=0, top_p=0.5), [1, 3])]:
        token, logprob = sample_tokens(logits, 1.0, kw["top_k"], kw["top_p"], generator)
        renormalised = torch.zeros(5)
        renormalised[kept] = probs[kept] / probs[kept].sum()
        frequencies = torch.bincount(token, minlength=5) / len(token)
        assert set(token.unique().tolist()) == set(kept)
        assert (frequencies - renormalised).abs().max() < 0.01  # 4 standard deviations at n = 40000
        assert torch.allclose(logprob, renormalised.log()[token], atol=1e-6)
    # temperature divides the logits before anything else
    token, logprob = sample_tokens(logits, 2.0, 0, 1.0, generator)
    tempered = (probs.log() / 2).softmax(-1)
    assert (torch.bincount(token, minlength=5) / len(token) - tempered).abs().max() < 0.01
    assert torch.allclose(logprob, tempered.log()[token], atol=1e-6)


def test_vocab_size_masks_padded_ids(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")
    # Temperature 5 flattens the distribution: without the mask ids >= 200 come up often.
    free = generate(model, PROMPTS, 30, temperature=5.0, seed=0)
    assert (free.tokens >= 200).any()
    out = generate(model, PROMPTS, 30, temperature=5.0, seed=0, vocab_size=200)
    assert (out.tokens < 200).all()
    # and the log-probs are renormalised over the 200 real ids
    rows = [p + c for p, c in zip(PROMPTS, out.completions())]
    for r, row in enumerate(rows):
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0, len(PROMPTS[r]) - 1:-1, :200] / 5.0
        expected = torch.log_softmax(logits, -1).gather(-1, out.tokens[r, :, None]).squeeze(-1)
        assert (out.logprobs[r] - expected).abs().max() <= 1e-4
    greedy = generate(model, PROMPTS, 10, temperature=0, vocab_size=200)
    assert (greedy.tokens < 200).all()


def test_bad_inputs_raise_clear_errors(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")  # max_position_embeddings = 256
    with pytest.raises(ValueError, match=r"prompts\[1\] has 250 tokens.*beyond the model's context of 256"):
        generate(model, [[1, 2], [3] * 250], 10)
    with pytest.raises(ValueError, match=r"max_new_tokens=300.*context of 256"):
        generate(model, [[1, 2]], 300)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        generate(model, [[], [1]], 5)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds an id outside 0..255"):
        generate(model, [[256]], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 5, top_p=0.0)
    generate(model, [[1] * 246], 10)  # exactly the context: fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_eager(tmp_path):
    model, _ = tiny_model(tmp_path, "qwen2")
    model = model.cuda()
    eager = generate(model, PROMPTS, 40, temperature=0, use_cuda_graph=False)
    graph = generate(model, PROMPTS, 40, temperature=0, use_cuda_graph=True)
    assert torch.equal(eager.tokens, graph.tokens) and torch.allclose(eager.logprobs, graph.logprobs, atol=1e-4)
    kw = dict(temperature=0.8, num_samples=2, eos_token_ids=[0, 1, 2, 3], use_cuda_graph=True)
    a, b = generate(model, PROMPTS, 40, seed=3, **kw), generate(model, PROMPTS, 40, seed=3, **kw)
    assert torch.equal(a.tokens, b.tokens)
    for r, expected in enumerate(training_logprobs(model, PROMPTS, a, 0.8)):
        assert (a.logprobs[r, :int(a.lengths[r])] - expected).abs().max() <= 1e-4


def test_block_search_samples_the_softmax_and_greedy_takes_the_first_max():
    # V = 384 = 3 blocks of 128: the token is found block by block (sample_tokens).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(384, generator=g) * 2
    logits[130:256] = float("-inf")  # the middle block is nearly all masked, the last ids too
    logits[-40:] = float("-inf")
    rows = logits[None].expand(60000, 384).contiguous()
    token, logprob = sample_tokens(rows, 1.0, 0, 1.0, g)
    probs = logits.softmax(-1)
    assert probs[token].min() > 0  # never a masked id
    frequencies = torch.bincount(token, minlength=384) / len(token)
    assert (frequencies - probs).abs().max() < 0.01
    assert torch.allclose(logprob, torch.log_softmax(logits, -1)[token], atol=1e-5)
    tied = torch.zeros(2, 384)
    tied[0, [200, 300]] = 5.0  # two maxima: the first wins, as with argmax
    tied[1, 383] = 1.0
    token, logprob = sample_tokens(tied, 0.0, 0, 1.0, g)
    assert token.tolist() == [200, 383]
    assert torch.allclose(logprob, torch.log_softmax(tied, -1)[[0, 1], [200, 383]])


def test_cpu_weight_copies_live_for_one_call_only(tmp_path, one_thread):
    # On CPU every Linear multiplies by a transposed copy of its weight during generate
    # (model.Linear); the copies are dropped when the call ends, so an in-place update of the
    # weights between calls (what an optimiser step does) is always seen.
    model, _ = tiny_model(tmp_path, "llama")  # untied head
    before = generate(model, PROMPTS[:1], 12, temperature=0).tokens[0].tolist()
    assert all(getattr(m, "weight_t", None) is None for m in model.modules())
    with torch.no_grad():
        model.lm_head.weight[before[0]] -= 100.0  # the first greedy token can no longer win
    after = generate(model, PROMPTS[:1], 12, temperature=0).tokens[0].tolist()
    assert after == greedy_by_recompute(model, PROMPTS[0], 12)
    assert after[0] != before[0]
