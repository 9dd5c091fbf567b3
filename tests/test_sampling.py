"""The per-token maths of generation (nanocausal.sampling): exact top-k / top-p supports on a known
distribution and against transformers' warpers, sampled frequencies and log-probs, the block-wise
inverse CDF, and the counter-based random numbers (exact 32-bit arithmetic, uniform, independent)."""
import pytest
import torch

from nanocausal.sampling import (LOWBIAS32_MULTIPLIERS, WEYL32, counter_uniform, filter_logits, mix32, mul32,
                                 sample_tokens, stream_key)

transformers = pytest.importorskip("transformers")


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
        uniform = torch.rand(len(logits), generator=generator)
        token, logprob = sample_tokens(logits, 1.0, kw["top_k"], kw["top_p"], uniform)
        renormalised = torch.zeros(5)
        renormalised[kept] = probs[kept] / probs[kept].sum()
        frequencies = torch.bincount(token, minlength=5) / len(token)
        assert set(token.unique().tolist()) == set(kept)
        assert (frequencies - renormalised).abs().max() < 0.01  # 4 standard deviations at n = 40000
        assert torch.allclose(logprob, renormalised.log()[token], atol=1e-6)
    # temperature divides the logits before anything else
    token, logprob = sample_tokens(logits, 2.0, 0, 1.0, torch.rand(len(logits), generator=generator))
    tempered = (probs.log() / 2).softmax(-1)
    assert (torch.bincount(token, minlength=5) / len(token) - tempered).abs().max() < 0.01
    assert torch.allclose(logprob, tempered.log()[token], atol=1e-6)


def test_block_search_samples_the_softmax_and_greedy_takes_the_first_max():
    # V = 384 = 3 blocks of 128: the token is found block by block (sample_tokens).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(384, generator=g) * 2
    logits[130:256] = float("-inf")  # the middle block is nearly all masked, the last ids too
    logits[-40:] = float("-inf")
    rows = logits[None].expand(60000, 384).contiguous()
    token, logprob = sample_tokens(rows, 1.0, 0, 1.0, torch.rand(len(rows), generator=g))
    probs = logits.softmax(-1)
    assert probs[token].min() > 0  # never a masked id
    frequencies = torch.bincount(token, minlength=384) / len(token)
    assert (frequencies - probs).abs().max() < 0.01
    assert torch.allclose(logprob, torch.log_softmax(logits, -1)[token], atol=1e-5)
    tied = torch.zeros(2, 384)
    tied[0, [200, 300]] = 5.0  # two maxima: the first wins, as with argmax
    tied[1, 383] = 1.0
    token, logprob = sample_tokens(tied, 0.0, 0, 1.0)
    assert token.tolist() == [200, 383]
    assert torch.allclose(logprob, torch.log_softmax(tied, -1)[[0, 1], [200, 383]])


def test_mul32_and_mix32_are_exact_32_bit_arithmetic():
    values = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF]
    for x in values:
        for m in (*LOWBIAS32_MULTIPLIERS, WEYL32, 0xFFFFFFFF):
            assert mul32(x, m) == (x * m) % 2 ** 32
    tensor = torch.tensor(values)
    assert mix32(tensor).tolist() == [mix32(x) for x in values]  # the device op is the host op
    assert mix32(0x12345678) == 4125564054  # lowbias32 in full-width Python arithmetic
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
    # sampling with them reproduces the distribution (test_sampled_frequencies_and_logprobs)
    probs = torch.tensor([0.15, 0.4, 0.05, 0.3, 0.1])
    logits = probs.log()[None].expand(40000, 5).contiguous()
    keys = torch.tensor([stream_key(1, i, 0) for i in range(40000)])
    token, logprob = sample_tokens(logits, 1.0, 0, 1.0, uniform=counter_uniform(keys, torch.full_like(keys, 5)))
    assert (torch.bincount(token, minlength=5) / 40000 - probs).abs().max() < 0.01
    assert torch.allclose(logprob, probs.log()[token], atol=1e-6)
