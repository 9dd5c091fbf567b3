"""The one generator (nanocausal.generate.generate_many) against references: the definition of greedy
decoding (a cache-free loop) and transformers' generate, single-prompt runs of itself (a batch of
one: nothing to refill), the training forward pass's log-probs, itself at other slot counts, widths
and with a compiled step, and the edge cases of a queue: more slots than prompts, one prompt, the
end of the context, one new token, an EOS first."""
import pytest
import torch

from conftest import make_hf_checkpoint
from nanocausal import generate
from nanocausal.checkpoint import load_model
from nanocausal.data import pad_batch
from nanocausal.generate import generate_many
from nanocausal.logprobs import token_logprobs

transformers = pytest.importorskip("transformers")

# initializer_range 0.2: peaked next-token distributions, so greedy continuations vary and a wrong
# cache column, position or mask shows up.
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
        hf_model = make_hf_checkpoint(path, model_type, **overrides)
        out[name] = load_model(path), hf_model
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


def alone(model, prompts, max_new_tokens, **kw):
    """generate_many on each prompt by itself (one group of slots, nothing to refill), rows concatenated."""
    runs = [generate_many(model, [p], max_new_tokens, slots=kw.get("num_samples", 1), **kw) for p in prompts]
    width = max(run.tokens.shape[1] for run in runs)
    pad = kw.get("pad_token_id", 0)
    return generate.Generation(
        tokens=torch.cat([torch.nn.functional.pad(r.tokens, (0, width - r.tokens.shape[1]), value=pad) for r in runs]),
        logprobs=torch.cat([torch.nn.functional.pad(r.logprobs, (0, width - r.logprobs.shape[1])) for r in runs]),
        completion_mask=torch.cat([torch.nn.functional.pad(r.completion_mask, (0, width - r.tokens.shape[1])) for r in runs]),
        lengths=torch.cat([r.lengths for r in runs]), stop_reason=sum((r.stop_reason for r in runs), []),
        prompt_index=torch.cat([r.prompt_index + i for i, r in enumerate(runs)]))


def greedy_by_recompute(model, prompt, new_tokens):
    """The definition of greedy decoding: re-run the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def hf_greedy(hf_model, prompt, new_tokens):
    """transformers' greedy generate on one prompt: a list of new_tokens ids."""
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def teacher_forced_logprobs(model, prompts, out, temperature):
    """token_logprobs of the training forward pass on prompt + completion, at the completion."""
    index = out.prompt_index.tolist()
    sequences = [prompts[p] + c for p, c in zip(index, out.completions())]
    masks = [[0] * len(prompts[p]) + [1] * len(c) for p, c in zip(index, out.completions())]
    batch = pad_batch(sequences, pad_id=0, masks=masks)
    ids, attention, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        logprobs = token_logprobs(model, ids, attention, completion_mask, temperature=temperature)
    return [logprobs[r][completion_mask[r].bool()] for r in range(len(sequences))]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_recompute_transformers_and_alone(models, name, monkeypatch):
    model, hf_model = models[name]
    single = alone(model, PROMPTS, 20, temperature=0)
    assert single.stop_reason == ["length"] * len(PROMPTS)
    for prompt, tokens in zip(PROMPTS, single.completions()):
        assert len(set(tokens)) > 3  # a continuation that exercises the cache, not one repeated id
        assert tokens == greedy_by_recompute(model, prompt, 20) == hf_greedy(hf_model, prompt, 20)
    for slots in (1, 3, 8):
        assert_same(generate_many(model, PROMPTS, 20, slots=slots, temperature=0, prefill_chunk=16), single)
    # The CUDA graphs' step (bucket widths; a bucket wider than the cache: every column attended,
    # scratch last), run eagerly here.
    monkeypatch.setattr(generate, "GRAPH_BUCKET", 10_000)
    assert_same(generate_many(model, PROMPTS, 20, slots=3, temperature=0, widths="bucket"), single)


def test_greedy_smollm2_matches_transformers(smollm2_path):
    model = load_model(smollm2_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))
    texts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
             "If it rains, the grass gets wet. The grass is wet, so"]
    prompts = [tokenizer.encode(text).ids for text in texts]
    out = generate_many(model, prompts, 64, slots=2, temperature=0)
    assert out.completions() == [hf_greedy(hf_model, prompt, 64) for prompt in prompts]


def test_greedy_with_eos_equals_alone(models):
    model, _ = models["qwen2"]
    single = alone(model, PROMPTS, 8, temperature=0, eos_token_ids=EOS, pad_token_id=255)
    assert len(set(single.lengths.tolist())) > 2 and "length" in single.stop_reason and "eos" in single.stop_reason
    for slots in (2, 5):
        out = generate_many(model, PROMPTS, 8, slots=slots, temperature=0, eos_token_ids=EOS, pad_token_id=255)
        assert_same(out, single)
        assert out.tokens.shape == single.tokens.shape and torch.equal(out.completion_mask, single.completion_mask)
        assert torch.equal(out.tokens, single.tokens)  # pad_token_id after each completion


def test_eos_stops_rows_independently(models):
    """A row's draws depend on its stream and token index only: with EOS ids, each row is the run
    without them cut after its first EOS, padded with pad_token_id, with the same log-probs."""
    model, _ = models["qwen2"]
    kw = dict(slots=4, temperature=1.0, num_samples=2, seed=7)
    free = generate_many(model, PROMPTS, 30, **kw)  # no EOS: the same draws
    out = generate_many(model, PROMPTS, 30, eos_token_ids=EOS, pad_token_id=255, **kw)
    lengths = []
    for r, row in enumerate(free.tokens.tolist()):
        first_eos = next((t for t, token in enumerate(row) if token in EOS), None)
        n = 30 if first_eos is None else first_eos + 1  # the EOS belongs to the completion
        lengths.append(n)
        assert out.stop_reason[r] == ("length" if first_eos is None else "eos")
        assert out.tokens[r, :n].tolist() == row[:n] and out.tokens[r, n:].eq(255).all()
        assert out.completion_mask[r].tolist() == [1] * n + [0] * (out.tokens.shape[1] - n)
        assert (out.logprobs[r, :n] - free.logprobs[r, :n]).abs().max() <= 1e-5  # other widths: float rounding
        assert out.logprobs[r, n:].eq(0).all()
    assert out.lengths.tolist() == lengths and len(set(lengths)) > 2 and "eos" in out.stop_reason
    assert out.tokens.shape[1] == max(lengths)
    done = generate_many(model, PROMPTS, 200, temperature=1.0, seed=7, eos_token_ids=list(range(128)))
    assert done.stop_reason == ["eos"] * len(PROMPTS) and done.tokens.shape[1] < 40  # stopped early, not after 200


def test_samples_identical_across_slot_counts(models, monkeypatch):
    model, _ = models["qwen2"]
    kw = dict(num_samples=2, seed=3, eos_token_ids=EOS, **SAMPLING)
    one = generate_many(model, PROMPTS, 30, slots=2, **kw)  # one group at a time (slots >= num_samples)
    assert len(set(one.lengths.tolist())) > 3
    for slots in (3, 8, 64):
        assert_same(generate_many(model, PROMPTS, 30, slots=slots, **kw), one)
    monkeypatch.setattr(generate, "GRAPH_BUCKET", 10_000)  # every column attended, as a CUDA graph of the full width
    assert_same(generate_many(model, PROMPTS, 30, slots=3, widths="bucket", **kw), one)
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
    model, _ = models["llama"]
    out = generate_many(model, PROMPTS, 20, slots=3, temperature=temperature, num_samples=2, seed=0,
                        eos_token_ids=[0, 1, 2, 3])
    assert not any(t.is_inference() for t in (out.tokens, out.logprobs, out.completion_mask))  # usable in training
    reference = teacher_forced_logprobs(model, PROMPTS, out, temperature if temperature > 0 else 1.0)
    for r, expected in enumerate(reference):
        n = int(out.lengths[r])
        # 2e-5: decode attention folds the query heads of a group (Attention.folded_decode_attention),
        # a different float32 summation order than the training forward's
        assert (out.logprobs[r, :n] - expected).abs().max() <= 2e-5
        assert (out.logprobs[r, n:] == 0).all()
        assert out.completion_mask[r].tolist() == [1] * n + [0] * (out.tokens.shape[1] - n)


def test_groups_share_their_prompt(models):
    model, _ = models["qwen2"]
    single = generate_many(model, PROMPTS, 12, slots=1, temperature=0)
    for slots in (3, 4, 7):  # 4 and 7: not multiples of the group size, some slots wait for a group to fit
        greedy = generate_many(model, PROMPTS, 12, slots=slots, temperature=0, num_samples=3)
        assert greedy.prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
        assert torch.equal(greedy.tokens, single.tokens.repeat_interleave(3, dim=0))
    sampled = generate_many(model, PROMPTS, 12, slots=4, temperature=1.0, num_samples=3, seed=0)
    for i in range(len(PROMPTS)):  # each sample of a group draws its own tokens, from the first one on
        group = sampled.tokens[3 * i:3 * i + 3].tolist()
        assert len({tuple(row) for row in group}) == 3


def test_edge_cases(models):
    model, _ = models["qwen2"]  # context 256
    greedy = dict(temperature=0)
    # more slots than prompts, and one prompt
    assert_same(generate_many(model, PROMPTS[:2], 10, slots=16, **greedy), alone(model, PROMPTS[:2], 10, **greedy))
    assert generate_many(model, PROMPTS[2:3], 10, slots=1, **greedy).completions() == \
        [greedy_by_recompute(model, PROMPTS[2], 10)]
    # prompts that (nearly) fill the context: their new tokens are capped by what it leaves
    long = [list(range(250)), [7] * 255]
    out = generate_many(model, [PROMPTS[0]] + long, 20, slots=2, **greedy)
    assert out.lengths.tolist() == [20, 6, 1] and out.stop_reason == ["length"] * 3
    assert out.completions()[1:] == [greedy_by_recompute(model, long[0], 6), greedy_by_recompute(model, long[1], 1)]
    with pytest.raises(ValueError, match=r"prompts\[1\] has 256 tokens: it fills the model's context of 256"):
        generate_many(model, [[1], [2] * 256], 5)
    # one new token: every slot is done at admission
    first = [greedy_by_recompute(model, p, 1) for p in PROMPTS]
    assert_same(generate_many(model, PROMPTS, 1, slots=2, **greedy), alone(model, PROMPTS, 1, **greedy))
    assert generate_many(model, PROMPTS, 1, slots=2, **greedy).completions() == first
    sampled = generate_many(model, PROMPTS, 1, slots=2, num_samples=2, seed=1)
    assert sampled.tokens.shape == (12, 1) and sampled.lengths.tolist() == [1] * 12
    # a row whose first token is an EOS
    eos = first[1][0]
    out = generate_many(model, PROMPTS, 15, slots=2, eos_token_ids=eos, **greedy)
    assert_same(out, alone(model, PROMPTS, 15, eos_token_ids=eos, **greedy))
    assert out.lengths[1] == 1 and out.stop_reason[1] == "eos" and out.tokens[1, 0] == eos
    # every row ends at its first token
    out = generate_many(model, PROMPTS, 15, slots=3, temperature=1.0, seed=0, eos_token_ids=range(256))
    assert out.lengths.tolist() == [1] * len(PROMPTS) and out.stop_reason == ["eos"] * len(PROMPTS)


def test_vocab_size_masks_padded_ids(models):
    model, _ = models["qwen2"]
    # Temperature 5 flattens the distribution: without the mask ids >= 200 come up often.
    free = generate_many(model, PROMPTS, 30, slots=3, temperature=5.0, seed=0)
    assert (free.tokens >= 200).any()
    out = generate_many(model, PROMPTS, 30, slots=3, temperature=5.0, seed=0, vocab_size=200)
    assert (out.tokens < 200).all()
    # and the log-probs are renormalised over the 200 real ids
    for r, row in enumerate(p + c for p, c in zip(PROMPTS, out.completions())):
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0, len(PROMPTS[r]) - 1:-1, :200] / 5.0
        expected = torch.log_softmax(logits, -1).gather(-1, out.tokens[r, :, None]).squeeze(-1)
        assert (out.logprobs[r] - expected).abs().max() <= 1e-4
    assert (generate_many(model, PROMPTS, 10, temperature=0, vocab_size=200).tokens < 200).all()


def test_bad_inputs_raise_clear_errors(models):
    model, _ = models["qwen2"]
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
    with pytest.raises(ValueError, match=r"prompts\[0\] holds an id outside 0..255"):
        generate_many(model, [[256]], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate_many(model, [[1]], 5, top_p=0.0)
    with pytest.raises(ValueError, match="widths must be 'used' or 'bucket'"):
        generate_many(model, [[1]], 5, widths="all")
    assert generate_many(model, [[1] * 255], 10).lengths.tolist() == [1]  # one column left: one token


def test_cpu_weight_copies_live_for_one_call_only(models):
    # On CPU every Linear multiplies by a transposed copy of its weight during a call
    # (model.Linear); the copies are dropped when the call ends, so an in-place update of the
    # weights between calls (what an optimiser step does) is always seen.
    model, _ = models["llama"]  # untied head
    before = generate_many(model, PROMPTS[:1], 12, temperature=0).completions()[0]
    assert all(getattr(m, "weight_t", None) is None for m in model.modules())
    weight = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight[before[0]] -= 100.0  # the first greedy token can no longer win
        after = generate_many(model, PROMPTS[:1], 12, temperature=0).completions()[0]
        assert after == greedy_by_recompute(model, PROMPTS[0], 12) and after[0] != before[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(weight)  # the module's model is shared


def test_compiled_decode_gives_the_same_tokens(models):
    """compile_decode=True (torch.compile of the decode step, before any CUDA-graph capture) samples
    the tokens of the eager step, at every width (one dynamic-shape compilation), and its log-probs
    up to float32 rounding (fused kernels sum in another order)."""
    model, _ = models["qwen2"]
    kw = dict(slots=4, num_samples=2, seed=1, eos_token_ids=EOS, **SAMPLING)
    eager = generate_many(model, PROMPTS[:3], 20, **kw)
    compiled = generate_many(model, PROMPTS[:3], 20, compile_decode=True, **kw)
    assert_same(compiled, eager, atol=1e-4)
    assert len(set(eager.lengths.tolist())) > 2 and compiled.stats == {"capture_seconds": {}}  # no graph on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_eager(models):
    model = models["qwen2"][0].cuda()
    try:
        for kw in (dict(temperature=0), dict(num_samples=2, seed=3, eos_token_ids=EOS, **SAMPLING)):
            eager = generate_many(model, PROMPTS, 40, slots=3, use_cuda_graph=False, widths="bucket", **kw)
            graph = generate_many(model, PROMPTS, 40, slots=3, use_cuda_graph=True, **kw)
            assert_same(graph, eager, atol=1e-4)  # at equal widths
            assert graph.stats["capture_seconds"] and min(graph.stats["capture_seconds"].values()) > 0
        reference = teacher_forced_logprobs(model, PROMPTS, graph, SAMPLING["temperature"])
        for r, expected in enumerate(reference):
            assert (graph.logprobs[r, :int(graph.lengths[r])] - expected).abs().max() <= 1e-4
    finally:
        model.cpu()
