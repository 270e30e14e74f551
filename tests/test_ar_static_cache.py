"""Static-shape KV cache and on-device decoding loop of the AR model (``StaticKVCache``, ``forward_static``,
``sampling._decode``): the static step equals the growing-cache step, greedy decoding gives exactly what the
previous host-side sampler gave (a frozen copy of it lives below), the host reads the device about once per
``check_every`` steps, seeded sampling is reproducible, and the compiled step (slow) equals the eager one."""

import math

import pytest
import torch
import torch.nn.functional as F

from ar_fixtures import left_padded, tiny_model

from flexitrain.models.tts.ar_layers import StaticKVCache
from flexitrain.models.tts.sampling import NOISE_CHUNK, SamplingConfig, _pick, generate, generate_batch
from flexitrain.utils.dispatch_count import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = torch.finfo(torch.float32).eps
# Static vs growing cache: the same products; only the summation order differs (softmax denominators and the
# attention-weighted sum run over W buffer columns instead of the valid ones, the extra terms being exact
# zeros; linear_pos runs on S table rows instead of T2). Each reduction moves by about an ulp; carried through
# the blocks and the final LayerNorm this measured <= 1.6 EPS x max|h| (2 and 4 blocks, 200 steps). Bound:
# 16 EPS x max|h|, ten times that.
ULPS = 16


def assert_ulps(actual, expected, ulps=ULPS):
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    assert diff <= ulps * EPS * scale, f"max |diff| {diff:.3g} > {ulps} eps x {scale:.3g}"


# ---- the sampler as it was before the static cache (host ints, growing cache): the greedy reference --------
def _old_sample(logits, top_k, temperature, generator):
    if top_k == 1 or temperature <= 0:
        return int(logits.argmax())
    if temperature != 1.0:
        logits = logits / temperature
    k = logits.size(-1) if top_k <= 0 else min(top_k, logits.size(-1))
    values, indices = logits.topk(k)
    choice = torch.multinomial(torch.softmax(values.float(), -1), 1, generator=generator)
    return int(indices[choice])


@torch.inference_mode()
def old_generate(model, text, framerate, prompt_text=None, prompt_tokens=None, prompt_durations=None,
                 config=None, generator=None, record=False, min_tokens=0):
    cfg = config or SamplingConfig()
    full_text = text if prompt_text is None else torch.cat([prompt_text, text], dim=1)
    prefix = model.decode_prefix(full_text, framerate, prompt_tokens, prompt_durations)
    max_len = int(text.size(1) * cfg.max_token_text_ratio)
    if cfg.max_tokens is not None:
        max_len = min(max_len, cfg.max_tokens)
    min_len = min(max(int(text.size(1) * cfg.min_token_text_ratio), int(min_tokens)), max_len)
    previous_duration = 0
    if prompt_tokens is not None and prompt_tokens.numel() and model.use_duration_conditioning:
        previous_duration = int(prompt_durations[0, -1])
    trace = {"step_logits": [], "step_duration_logits": [], "step_hidden": []}
    tokens, durations, cache, new_input, stopped = [], [], None, prefix, False

    def predict_duration(hidden):
        logits = model.duration_decoder(hidden)[0]
        trace["step_duration_logits"].append(logits)
        logits = logits.clone()
        logits[0] = float("-inf")
        return _old_sample(logits, cfg.duration_top_k, cfg.duration_temperature, generator)

    for i in range(max_len):
        hidden, cache = model.step(new_input, cache)
        trace["step_hidden"].append(hidden[0])
        if i > 0:
            previous_duration = predict_duration(hidden)
            durations.append(previous_duration)
        logits = model.llm_decoder(hidden)[0]
        trace["step_logits"].append(logits)
        if i < min_len:
            logits = logits.clone()
            logits[model.eos_id] = float("-inf")
        token = _old_sample(logits, cfg.top_k, cfg.temperature, generator)
        if token == model.eos_id:
            stopped = True
            break
        tokens.append(token)
        cond = torch.tensor([[previous_duration]])
        new_input = model.speech_inputs(torch.tensor([[token]]), cond).to(prefix.dtype)
    if len(durations) < len(tokens):
        durations.append(predict_duration(model.step(new_input, cache)[0]))
    trace = {k: torch.stack(v) if v else torch.empty(0) for k, v in trace.items()}
    return tokens, durations, stopped, trace


def outcome(res):
    return res.tokens[0].tolist(), res.durations[0].tolist(), res.stopped_by_eos


# ---- the static step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks,window", [(2, None), (2, "bucket"), (4, "bucket")])
def test_static_step_equals_growing_cache_step(blocks, window):
    """Hidden states of 70 single-position steps after a 37-position prefix: static cache (whole buffer, or a
    window of the used columns rounded up to 64) vs ``step`` with the growing cache. The columns written hold
    the same keys/values as the growing cache, and nothing is written elsewhere."""
    model = tiny_model(llm_blocks=blocks)
    d = model.llm_dim
    torch.manual_seed(1)
    prefix, steps = torch.randn(1, 37, d), torch.randn(1, 70, d)
    with torch.no_grad():
        out, cache = model.llm.forward_chunk(prefix, None)
        static = StaticKVCache(model.llm, 1, 256, cache[0][0])
        assert static.load(cache) == 37
        for j in range(steps.size(1)):
            x = steps[:, j: j + 1]
            hidden, cache = model.step(x, cache)
            w = None if window is None else min(256, -(-(38 + j) // 64) * 64)
            static_hidden = model.static_step(x, static, torch.tensor([37 + j]), w)
            assert static_hidden.shape == hidden.shape
            assert_ulps(static_hidden, hidden)
        for (k, v), keys, values in zip(cache, static.keys, static.values):
            assert_ulps(keys[:, :, :107], k)
            assert_ulps(values[:, :, :107], v)
            assert not keys[:, :, 107:].any() and not values[:, :, 107:].any()


def test_static_step_with_left_padding_equals_rows_alone():
    """Left-padded rows (offsets) in one static cache: each row's outputs equal the row decoded alone."""
    model = tiny_model(seed=1)
    lm, d = model.llm, model.llm_dim
    torch.manual_seed(0)
    seqs = [torch.randn(1, n, d) for n in (7, 3, 5)]
    steps = torch.randn(3, 6, d)
    total = max(s.size(1) for s in seqs)
    padded, offsets = left_padded(seqs)
    with torch.no_grad():
        _, cache = lm.forward_chunk(padded, None, offsets)
        static = StaticKVCache(lm, 3, 64, cache[0][0], offsets)
        static.load(cache)
        outs = [model.static_step(steps[:, j: j + 1], static, torch.tensor([total + j])) for j in range(6)]
        for i, s in enumerate(seqs):
            _, ref_cache = lm.forward_chunk(s, None)
            for j in range(6):
                ref, ref_cache = model.step(steps[i: i + 1, j: j + 1], ref_cache)
                assert_ulps(outs[j][i], ref[0])


def test_position_projection_once_per_generation():
    """linear_pos runs twice per layer and generation (the prefix chunk, and the static table), not per step."""
    model = tiny_model()
    calls = []
    hooks = [layer.self_attn.linear_pos.register_forward_hook(lambda *a: calls.append(1))
             for layer in model.llm.encoders]
    cfg = SamplingConfig(top_k=1, duration_top_k=1, max_tokens=40, min_token_text_ratio=1e9)
    res = generate(model, torch.tensor([[5, 6, 7, 8, 9]]), 0.91, config=cfg)
    for h in hooks:
        h.remove()
    assert res.tokens.size(1) == 40 and len(calls) == 2 * len(model.llm.encoders)


# ---- greedy decoding: exactly the previous sampler --------------------------------------------------------
def cases():
    g = torch.Generator().manual_seed(0)
    ids = lambda n, hi=300: torch.randint(1, hi, (1, n), generator=g)  # noqa: E731
    prompt = lambda n: (ids(n, 50) - 1, torch.randint(1, 9, (1, n), generator=g))  # noqa: E731
    p5, p9 = prompt(5), prompt(9)
    return [  # (text, framerate, prompt_text, prompt_tokens, prompt_durations, config overrides, min_tokens)
        (ids(4), 0.86, None, None, None, {}, 0),
        (ids(6), 0.91, ids(3), *p5, {}, 0),
        (ids(9), None, ids(2), *p9, {"max_tokens": 11}, 0),
        (ids(3), 0.91, ids(4), *p5, {"min_token_text_ratio": 0.0}, 0),
        (ids(5), 0.86, None, *p9, {"max_token_text_ratio": 6.0}, 7),
        (ids(2), 0.91, None, None, None, {"max_tokens": 1}, 0),
    ]


@pytest.mark.parametrize("eos_bias", [0.0, 0.6, 3.0])
@pytest.mark.parametrize("conditioning", [True, False], ids=["dur_cond", "no_dur_cond"])
def test_greedy_equals_previous_sampler(eos_bias, conditioning):
    """Tokens, durations and stop reason identical to the previous sampler, for prompts / no prompt, both frame
    rates and none, min-length masking, min_tokens, length caps (incl. a cap of one) and EOS stops; the
    record=True trace has the same entries (hidden states and logits within the rounding bound)."""
    model = tiny_model(seed=2, eos_bias=eos_bias, use_duration_conditioning=conditioning)
    base = dict(top_k=1, duration_top_k=1, max_token_text_ratio=3.0, min_token_text_ratio=0.5)
    stops = set()
    for text, fr, ptext, ptok, pdur, over, min_tokens in cases():
        cfg = SamplingConfig(**{**base, **over})
        old = old_generate(model, text, fr, ptext, ptok, pdur, cfg, min_tokens=min_tokens)
        for check_every in (1, 5, 16):
            res = generate(model, text, fr, ptext, ptok, pdur, SamplingConfig(**{**base, **over},
                           check_every=check_every), record=True, min_tokens=min_tokens)
            assert outcome(res) == old[:3]
            assert res.tokens.size(1) == res.durations.size(1)
            for k, v in old[3].items():
                assert res.trace[k].shape == v.shape, k
                if v.numel():
                    assert_ulps(res.trace[k], v)
        stops.add(old[2])
    if eos_bias == 0.6:
        assert stops == {True, False}  # both stop reasons are exercised


def test_greedy_batch_equals_previous_sampler():
    """generate_batch (static cache shared by left-padded rows that finish at different steps) vs the
    previous single-utterance sampler, item by item."""
    model = tiny_model(seed=2, eos_bias=0.6)
    cfg = SamplingConfig(top_k=1, duration_top_k=1, max_token_text_ratio=3.0, min_token_text_ratio=0.5,
                         check_every=4)
    cs = cases()
    texts, frs, ptexts, ptoks, pdurs = ([c[i] for c in cs] for i in range(5))
    frs = [0.86 if f is None else f for f in frs]
    batched = generate_batch(model, texts, frs, ptexts, ptoks, pdurs, cfg)
    old = [old_generate(model, t, f, pt, pk, pd, cfg)[:3] for t, f, pt, pk, pd in zip(texts, frs, ptexts, ptoks, pdurs)]
    assert [outcome(r) for r in batched] == old
    assert {o[2] for o in old} == {True, False}


def test_zero_length_cap():
    model = tiny_model()
    res = generate(model, torch.tensor([[3, 4]]), 0.91, config=SamplingConfig(max_tokens=0), record=True)
    assert outcome(res) == ([], [], False) and res.trace["step_logits"].numel() == 0
    (b,) = generate_batch(model, [torch.tensor([[3, 4]])], 0.91, config=SamplingConfig(max_tokens=0))
    assert outcome(b) == ([], [], False)


# ---- host reads ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check_every", [4, 16])
@pytest.mark.parametrize("top_k", [1, 25])
def test_syncs_per_token(check_every, top_k):
    """SyncCounter (CPU tensors counted as device tensors): at most one host read per check_every steps plus
    O(1) per call: the final read of lengths/stop flags, and on CPU the text-id range check (2). The previous
    sampler read twice per token."""
    model = tiny_model()
    n = 96
    text, prompt = torch.tensor([[5, 6, 7]]), (torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    cfg = SamplingConfig(top_k=top_k, duration_top_k=3, max_tokens=n, max_token_text_ratio=1e9,
                         min_token_text_ratio=1e9, check_every=check_every)
    with SyncCounter() as c:
        res = generate(model, text, 0.91, None, *prompt, cfg, generator=torch.Generator().manual_seed(0))
    assert res.tokens.size(1) == n
    assert c.syncs <= n // check_every + 3, c.report()
    assert set(c.sync_counts) <= {"Tensor.__bool__", "Tensor.tolist", "Tensor.__int__"}, c.report()
    with SyncCounter() as c:  # a batch: the same per call, not per item
        res = generate_batch(model, [text] * 4, 0.91, None, [prompt[0]] * 4, [prompt[1]] * 4, cfg)
    assert all(r.tokens.size(1) == n for r in res)
    assert c.syncs <= n // check_every + 3, c.report()
    with SyncCounter() as c:
        old_generate(model, text, 0.91, None, *prompt, cfg)
    assert c.syncs >= 2 * n


def test_eos_stop_costs_at_most_check_every_extra_steps():
    """After EOS the loop runs on until the next check (then trims); it never runs past it."""
    model = tiny_model(eos_bias=3.0)
    steps = []
    orig = model.static_step

    def counting(*a, **k):
        steps.append(1)
        return orig(*a, **k)

    model.static_step = counting
    cfg = SamplingConfig(top_k=1, duration_top_k=1, max_tokens=200, max_token_text_ratio=1e9, check_every=8)
    res = generate(model, torch.tensor([[5, 6, 7]]), 0.91, config=cfg)
    n = res.tokens.size(1)
    assert res.stopped_by_eos and n < 200
    assert n <= len(steps) <= max(8, -(-n // 8) * 8)  # step 0 (the prefix) is not a static step


# ---- sampling ----------------------------------------------------------------------------------------------
def test_pick_draws_from_the_top_k_softmax():
    """_pick (exponential race on the device) samples the top-k softmax of logits / temperature: frequencies
    over 60000 draws within 5 standard deviations of the probabilities; greedy = argmax; top_k <= 0 = all."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    for top_k, temperature in [(4, 1.0), (6, 0.7), (0, 1.3)]:
        k = 12 if top_k <= 0 else top_k
        n = 60000
        noise = torch.empty(n, k).exponential_(generator=torch.Generator().manual_seed(1))
        ids = _pick(logits.expand(n, -1), top_k, temperature, noise)
        values, indices = (logits[0] / temperature).topk(k)
        p = torch.zeros(12).index_put_((indices,), torch.softmax(values, -1))
        freq = torch.bincount(ids, minlength=12).double() / n
        sd = (p.double() * (1 - p.double()) / n).sqrt()
        assert ((freq - p.double()).abs() <= 5 * sd + 1e-12).all(), (top_k, freq, p)
    assert _pick(logits, 1, 1.0, None).tolist() == [int(logits.argmax())]
    assert _pick(logits, 5, 0.0, None).tolist() == [int(logits.argmax())]


def test_seeded_sampling_is_deterministic():
    """Same seed -> same tokens/durations whatever check_every (the draws are made NOISE_CHUNK steps at a time,
    independently of the host checks); another seed -> other tokens. Sampled lengths respect min/max."""
    model = tiny_model(seed=3, eos_bias=1.0)
    text = torch.tensor([[11, 12, 13, 14, 15]])
    prompt = (torch.tensor([[21, 22]]), torch.tensor([[4, 5, 6]]), torch.tensor([[2, 3, 1]]))
    base = dict(top_k=5, temperature=1.3, duration_top_k=3, duration_temperature=0.8, max_token_text_ratio=8,
                min_token_text_ratio=4.0)
    runs = [outcome(generate(model, text, 0.86, *prompt, config=SamplingConfig(**base, check_every=c),
                             generator=torch.Generator().manual_seed(7))) for c in (1, 7, 16, 16)]
    assert all(r == runs[0] for r in runs)
    assert len(runs[0][0]) > NOISE_CHUNK  # more than one chunk of draws
    other = outcome(generate(model, text, 0.86, *prompt, config=SamplingConfig(**base),
                             generator=torch.Generator().manual_seed(8)))
    assert other != runs[0]
    for r in (runs[0], other):
        assert 20 <= len(r[0]) <= 40 and len(r[1]) == len(r[0]) and all(1 <= d <= 9 for d in r[1])
    # a batch of one draws what generate draws; recompute (use_cache=False) too
    (b,) = generate_batch(model, [text], 0.86, *[[p] for p in prompt], config=SamplingConfig(**base),
                          generator=torch.Generator().manual_seed(7))
    assert outcome(b) == runs[0]
    rec = generate(model, text, 0.86, *prompt, config=SamplingConfig(**base, use_cache=False),
                   generator=torch.Generator().manual_seed(7))
    assert outcome(rec) == runs[0]


def test_clear_errors():
    model = tiny_model()
    text = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="check_every"):
        generate(model, text, 0.91, config=SamplingConfig(check_every=0))
    with pytest.raises(ValueError, match="compile_step needs use_cache"):
        generate(model, text, 0.91, config=SamplingConfig(compile_step=True, use_cache=False))
    with pytest.raises(ValueError, match="always uses the KV cache"):
        generate_batch(model, [text], 0.91, config=SamplingConfig(use_cache=False))
    with pytest.raises(ValueError, match="min_tokens: 1 entries for 2"):
        generate_batch(model, [text, text], 0.91, min_tokens=[3])
    with pytest.raises(RuntimeError, match="eval"):
        generate(model.train(), text, 0.91)
    with pytest.raises(RuntimeError, match="forward_static is for decoding"):
        model.llm.forward_static(torch.zeros(1, 1, model.llm_dim), None, torch.tensor([0]))
    model.eval()
    with torch.no_grad():
        _, cache = model.llm.forward_chunk(torch.zeros(1, 9, model.llm_dim), None)
    with pytest.raises(ValueError, match="does not fit a static cache of 8"):
        StaticKVCache(model.llm, 1, 8, cache[0][0]).load(cache)


# ---- compiled step -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_step_equals_eager_step():
    """compile_step=True (CPU: torch.compile default mode) gives the eager step's tokens, durations and stop
    reasons, greedy and seeded-sampled, for one utterance and a batch; traces within the rounding bound (the
    compiled kernels may fuse/reorder reductions: 64 EPS x max)."""
    model = tiny_model(seed=2, eos_bias=0.6)
    cs = cases()
    for over in (dict(top_k=1, duration_top_k=1), dict(top_k=5, temperature=1.2, duration_top_k=3)):
        base = dict(max_token_text_ratio=3.0, min_token_text_ratio=0.5, **over)
        for text, fr, ptext, ptok, pdur, extra, min_tokens in cs[:3]:
            res = [generate(model, text, fr, ptext, ptok, pdur, SamplingConfig(**base, **extra, compile_step=c),
                            generator=torch.Generator().manual_seed(4), record=True, min_tokens=min_tokens)
                   for c in (False, True)]
            assert outcome(res[1]) == outcome(res[0])
            for k in ("step_hidden", "step_logits", "step_duration_logits"):
                if res[0].trace[k].numel():
                    assert_ulps(res[1].trace[k], res[0].trace[k], ulps=64)
        texts, frs, ptexts, ptoks, pdurs = ([c[i] for c in cs] for i in range(5))
        frs = [0.86 if f is None else f for f in frs]
        runs = [generate_batch(model, texts, frs, ptexts, ptoks, pdurs, SamplingConfig(**base, compile_step=c),
                               generator=torch.Generator().manual_seed(4)) for c in (False, True)]
        assert [outcome(r) for r in runs[1]] == [outcome(r) for r in runs[0]]


def test_reused_buffers_give_fresh_results():
    """reuse_buffers (on by default with compile_step): the second call of the same shapes runs in the first
    call's buffers (same addresses), re-initialised in place; results equal fresh buffers', also after the
    weights change (the position projections are recomputed) and for a batch with other offsets."""
    from flexitrain.models.tts.sampling import release_decode_buffers

    model = tiny_model(seed=2, eos_bias=0.6)
    cs = cases()
    base = dict(top_k=1, duration_top_k=1, max_token_text_ratio=3.0, min_token_text_ratio=0.5)
    reuse, fresh = SamplingConfig(**base, reuse_buffers=True), SamplingConfig(**base)
    pointers, reused = set(), []
    for text, fr, ptext, ptok, pdur, _, _ in cs[:3] + cs[:1]:  # reusing calls in a row (a fresh call frees them)
        reused.append(generate(model, text, fr, ptext, ptok, pdur, reuse))
        pointers.add(model.__dict__["_static_decode_buffers"][1].cache.keys[0].data_ptr())
    assert len(pointers) == 1  # all four fit one bucket of columns
    for (text, fr, ptext, ptok, pdur, _, _), a in zip(cs[:3] + cs[:1], reused):
        assert outcome(a) == outcome(generate(model, text, fr, ptext, ptok, pdur, fresh))
    with torch.no_grad():
        model.llm.encoders[0].self_attn.linear_pos.weight.mul_(1.5)
    text, fr, ptext, ptok, pdur = cs[1][:5]
    assert outcome(generate(model, text, fr, ptext, ptok, pdur, reuse)) == outcome(
        generate(model, text, fr, ptext, ptok, pdur, fresh))
    texts, ptexts, ptoks, pdurs = ([c[i] for c in cs[:4]] for i in (0, 2, 3, 4))
    for order in (slice(None), slice(None, None, -1)):
        got = generate_batch(model, texts[order], 0.91, ptexts[order], ptoks[order], pdurs[order], reuse)
        want = generate_batch(model, texts[order], 0.91, ptexts[order], ptoks[order], pdurs[order], fresh)
        assert [outcome(r) for r in got] == [outcome(r) for r in want]
    release_decode_buffers(model)
    assert "_static_decode_buffers" not in model.__dict__
