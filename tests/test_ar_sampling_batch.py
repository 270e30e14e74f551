"""Batched AR decoding (``generate_batch``): left-padded prefixes + one KV cache give, with greedy settings,
exactly the tokens, durations and stop reasons of ``generate`` run on each utterance alone; the
left-padding mask of ``forward_chunk``; limits and reproducibility of sampled batches."""

import pytest
import torch

import ar_fixtures
from ar_fixtures import left_padded

from flexitrain.models.tts.sampling import SamplingConfig, generate, generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(top_k=1, duration_top_k=1, max_token_text_ratio=3.0, min_token_text_ratio=0.7)


def tiny_model(seed=0, eos_bias=0.0, **kw):
    return ar_fixtures.tiny_model(seed, eos_bias, **{"llm_blocks": 2, **kw})


def inputs(seed=0):
    """3 utterances with target texts of 3/6/9 ids, prompt texts of 4/1/2 ids and prompts of 5/2/9 tokens."""
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(1, 300, (1, n), generator=g) for n in (3, 6, 9)]
    prompt_texts = [torch.randint(1, 300, (1, n), generator=g) for n in (4, 1, 2)]
    prompt_tokens = [torch.randint(0, 50, (1, n), generator=g) for n in (5, 2, 9)]
    prompt_durations = [torch.randint(1, 9, (1, n), generator=g) for n in (5, 2, 9)]
    return texts, prompt_texts, prompt_tokens, prompt_durations


def results(res):
    return [(r.tokens.tolist(), r.durations.tolist(), r.stopped_by_eos) for r in res]


@pytest.mark.parametrize("prompted", [True, False], ids=["prompts", "no_prompts"])
def test_greedy_batch_equals_one_at_a_time(prompted):
    model = tiny_model(eos_bias=0.5)
    texts, ptexts, ptokens, pdurs = inputs()
    if not prompted:
        ptexts = ptokens = pdurs = [None] * 3
    framerates = [0.86, 0.91, 0.86]  # one threshold per item
    cfg = SamplingConfig(**GREEDY)
    alone = [generate(model, t, f, pt, pk, pd, cfg)
             for t, f, pt, pk, pd in zip(texts, framerates, ptexts, ptokens, pdurs)]
    batched = generate_batch(model, texts, framerates, ptexts, ptokens, pdurs, cfg)
    assert results(batched) == results(alone)
    assert all(r.tokens.size(1) == r.durations.size(1) for r in batched)
    if prompted:  # the case exercises both stop reasons, items leaving mid-run and cache trimming
        assert [(r.tokens.size(1), r.stopped_by_eos) for r in alone] == [(6, True), (18, False), (15, True)]
    # same threshold for all, given as one float
    alone = [generate(model, t, 0.91, pt, pk, pd, cfg) for t, pt, pk, pd in zip(texts, ptexts, ptokens, pdurs)]
    assert results(generate_batch(model, texts, 0.91, ptexts, ptokens, pdurs, cfg)) == results(alone)


def test_padded_tensor_inputs_equal_list_inputs():
    model = tiny_model(eos_bias=0.5)
    texts, ptexts, ptokens, pdurs = inputs()
    ptexts[1] = ptokens[1] = pdurs[1] = None  # item 1 without a prompt: length 0 in the padded form

    def pad(rows):
        lengths = [0 if r is None else r.size(1) for r in rows]
        out = torch.full((len(rows), max(lengths)), 7, dtype=torch.long)  # nonzero padding must not matter
        for i, r in enumerate(rows):
            if r is not None:
                out[i, : r.size(1)] = r[0]
        return out, torch.tensor(lengths)

    (t, tl), (pt, ptl), (pk, pl), (pd, _) = pad(texts), pad(ptexts), pad(ptokens), pad(pdurs)
    cfg = SamplingConfig(**GREEDY)
    from_lists = generate_batch(model, texts, 0.86, ptexts, ptokens, pdurs, cfg)
    from_padded = generate_batch(model, t, 0.86, pt, pk, pd, cfg, text_lengths=tl, prompt_text_lengths=ptl,
                                 prompt_lengths=pl)
    assert results(from_padded) == results(from_lists)
    assert results(from_lists)[1] == results([generate(model, texts[1], 0.86, config=cfg)])[0]


def test_batch_of_one_equals_generate_with_sampling():
    model = tiny_model(seed=3)
    text = torch.tensor([[11, 12, 13, 14]])
    prompt = (torch.tensor([[21, 22]]), torch.tensor([[4, 5, 6]]), torch.tensor([[2, 3, 1]]))
    cfg = SamplingConfig(top_k=5, temperature=1.3, duration_top_k=3, duration_temperature=0.8, max_token_text_ratio=6)
    a = generate(model, text, 0.86, *prompt, config=cfg, generator=torch.Generator().manual_seed(7))
    (b,) = generate_batch(model, [text], 0.86, *[[p] for p in prompt], config=cfg,
                          generator=torch.Generator().manual_seed(7))
    assert results([b]) == results([a]) and a.tokens.size(1) > 0  # one multinomial draw per step, as generate


def test_sampled_batch_limits_and_reproducibility():
    model = tiny_model(eos_bias=1.0)
    texts, ptexts, ptokens, pdurs = inputs(seed=1)
    cfg = SamplingConfig(top_k=10, temperature=1.2, duration_top_k=3, duration_temperature=0.8,
                         max_token_text_ratio=3.0, min_token_text_ratio=1.0, max_tokens=20)
    runs = [generate_batch(model, texts, 0.91, ptexts, ptokens, pdurs, cfg, torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert results(runs[0]) == results(runs[1])
    for text, r in zip(texts, runs[0]):
        n, cap = r.tokens.size(1), min(int(text.size(1) * 3.0), 20)
        assert r.durations.size(1) == n and n <= cap and (r.stopped_by_eos or n == cap)
        assert n >= int(text.size(1) * 1.0)  # no EOS before min_len
        assert ((r.tokens >= 0) & (r.tokens < 50)).all() and ((r.durations >= 1) & (r.durations <= 9)).all()
    with pytest.raises(RuntimeError, match="eval"):
        generate_batch(model.train(), texts, 0.91)


def test_left_padded_chunks_equal_unpadded():
    """forward_chunk(offsets=...): a left-padded item's outputs (prefix chunk, then single steps against the
    cache) equal the item run alone; padding rows stay finite; offsets=None is the old behaviour."""
    model = tiny_model(seed=1)
    lm, d = model.llm, model.llm_dim
    torch.manual_seed(0)
    seqs = [torch.randn(1, n, d) for n in (7, 3, 5)]
    steps = torch.randn(3, 4, d)  # 4 single-position steps per item
    padded, offsets = left_padded(seqs)
    with torch.no_grad():
        out, cache = lm.forward_chunk(padded, None, offsets)
        assert torch.isfinite(out).all()
        outs = [out]
        for j in range(steps.size(1)):
            o, cache = lm.forward_chunk(steps[:, j: j + 1], cache, offsets)
            outs.append(o)
        for i, s in enumerate(seqs):
            ref, ref_cache = lm.forward_chunk(s, None)
            refs = [ref]
            for j in range(steps.size(1)):
                o, ref_cache = lm.forward_chunk(steps[i: i + 1, j: j + 1], ref_cache)
                refs.append(o)
            torch.testing.assert_close(outs[0][i, offsets[i]:], refs[0][0], atol=1e-5, rtol=1e-5)
            for a, b in zip(outs[1:], refs[1:]):
                torch.testing.assert_close(a[i], b[0], atol=1e-5, rtol=1e-5)
        # no padding at all: identical to the unmasked call
        full, _ = lm.forward_chunk(padded, None, torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(full, lm.forward_chunk(padded, None)[0], atol=0, rtol=0)
