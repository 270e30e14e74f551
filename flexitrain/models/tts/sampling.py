"""Decoding for the AR text-to-token model: top-k/temperature for tokens, separate top-k/temperature for
durations, key/value cache, prompt continuation, EOS or a length cap.

Differences from the official ``TransformerLM.inference`` (tts.md §1.7, §7), all deliberate:
- the prompt is tokenised at the *generation* threshold (``encode_prompt``), not always at 0.91 (bug B1);
- every generated token gets a duration: when the length cap stops decoding, one more LM step predicts the
  last token's duration (the original returns one duration fewer, bug B4);
- duration class 0 (the "no previous token" id, never a target) is never sampled;
- EOS before ``min_len`` is masked out before top-k instead of rejection sampling.
With top_k=1 and duration_top_k=1 the tokens equal the original's greedy output (tested).

How a generation runs (``generate`` and ``generate_batch`` share it): the prefix goes through the LM once
(``forward_chunk``) and its keys/values are copied into a static-shape cache (``StaticKVCache``: per layer
[B, H, S, dk] buffers allocated once, the relative-position projections computed once). Every later step has
the same shapes and keeps everything on the device: the step writes its key/value column at a position held
in a device tensor, samples the duration of the token fed last and the next token on the device (top-k +
temperature as an exponential race, argmax when greedy), writes them into device buffers, builds the next
input embedding and updates per-row "finished" flags (EOS, or the length cap after its extra duration step).
The host only reads those flags every ``check_every`` steps and the lengths once at the end (then trims what
was decoded after a row finished), so on a GPU it runs ahead of the device; ``compile_step`` wraps the step
in ``torch.compile`` (``mode="reduce-overhead"``, CUDA graphs, on CUDA).

Random draws: a top-k draw is ``argmax(softmax(top-k logits) / E)`` with E ~ Exp(1) i.i.d. (the same
distribution as ``torch.multinomial``, which reads the probabilities back to the host to check them). The E
are drawn ``NOISE_CHUNK`` steps at a time from ``generator`` outside the step, so the eager and the compiled
step take the same decisions and a seeded generation is reproducible whatever ``check_every``; the draws
differ from the per-step ``multinomial`` of earlier versions (same distribution, other samples). Greedy
settings draw nothing.

``generate_batch`` decodes several utterances together (left-padded prefixes, one static cache); with greedy
settings it returns what ``generate`` returns for each utterance alone (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from flexitrain.models.tts.ar_layers import StaticKVCache
from flexitrain.models.tts.ar_tts import ARTTSModel

NOISE_CHUNK = 16    # steps of exponential draws made at once (fixed: the samples do not depend on check_every)
CACHE_BUCKET = 256  # static cache columns are rounded up to a multiple (fewer distinct shapes to compile)
WINDOW_BUCKET = 64  # eager steps attend over the used columns rounded up to this (compiled steps: all S)


@dataclass
class SamplingConfig:
    top_k: int = 25                     # official default; 1 = greedy
    temperature: float = 1.0
    duration_top_k: int = 1             # official public default (internal eval: 2 at temperature 0.8)
    duration_temperature: float = 1.0
    max_token_text_ratio: float = 20.0  # cap = ratio * target text length (prompt text excluded)
    min_token_text_ratio: float = 0.0
    max_tokens: int | None = None       # absolute cap, overrides the ratio when smaller
    use_cache: bool = True              # False: recompute the whole sequence every step (reference/tests)
    check_every: int = 16               # the host looks for "all finished" every this many steps (one sync each)
    compile_step: bool = False          # torch.compile the per-token step (CUDA: mode="reduce-overhead")
    reuse_buffers: bool | None = None   # keep the static buffers on the model for the next call of the same
    #                                     shapes (same addresses: CUDA graphs replay without re-recording);
    #                                     None = only with compile_step


@dataclass
class GenerationResult:
    tokens: torch.Tensor        # [1, N] speech tokens (EOS excluded)
    durations: torch.Tensor     # [1, N] duration classes (12.5 Hz frames per token)
    stopped_by_eos: bool
    trace: dict = field(default_factory=dict)  # with record=True: per-step logits / hidden states


def _greedy(top_k: int, temperature: float) -> bool:
    return top_k == 1 or temperature <= 0


def _pick(logits: torch.Tensor, top_k: int, temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] -> ids [B] on the device. Greedy: argmax. Else the top-k
    (all V when top_k <= 0) of logits / temperature, and the index maximising softmax / noise, noise [B, k]
    i.i.d. Exp(1): a draw from the top-k softmax (exponential race), with no host read."""
    if _greedy(top_k, temperature):
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    values, indices = logits.topk(noise.size(-1), dim=-1)
    probs = torch.softmax(values.float(), -1)
    return indices.gather(-1, (probs / noise).argmax(-1, keepdim=True)).squeeze(-1)


def _full_recompute(model: ARTTSModel, inputs: list[torch.Tensor]) -> torch.Tensor:
    seq = torch.cat(inputs, dim=1)
    return model.llm(seq, torch.tensor([seq.size(1)], device=seq.device))[:, -1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class _StepSpec:
    """The Python constants of a decoding step (what a compiled step specialises on)."""
    eos_id: int
    vocab: int                 # speech tokens (EOS excluded): the embedding's rows
    top_k: int
    temperature: float
    duration_top_k: int
    duration_temperature: float
    record: bool
    predict_durations: bool = True  # False: no duration head; every token is conditioned on the first duration


class _DecodeState:
    """Every tensor a decoding step reads or writes, allocated once per generation (fixed shapes and
    addresses). Rows b < B; S columns (cache positions, and the step index of the output buffers)."""

    def __init__(self, model: ARTTSModel, spec: _StepSpec, batch: int, columns: int, x_like: torch.Tensor,
                 cache: StaticKVCache | None):
        device = x_like.device
        long = dict(device=device, dtype=torch.long)
        self.cache = cache
        self.step = torch.zeros(1, **long)                          # i: the step being run
        self.position = torch.zeros(1, **long)                      # cache column of this step's input
        self.x = torch.zeros(batch, 1, model.llm_dim, device=device, dtype=x_like.dtype)  # next LM input
        self.previous = torch.zeros(batch, **long)                  # duration of the token fed last
        self.min_len, self.max_len = torch.zeros(batch, **long), torch.zeros(batch, **long)
        self.tokens = torch.zeros(batch, columns, **long)           # token i at column i
        self.durations = torch.zeros(batch, columns, **long)        # duration of token i at column i
        self.lengths = torch.zeros(batch, **long)
        self.finished = torch.zeros(batch, device=device, dtype=torch.bool)
        self.stopped_by_eos = torch.zeros(batch, device=device, dtype=torch.bool)
        vocab_out = model.llm_decoder.out_features
        self.eos_column = torch.arange(vocab_out, device=device) == spec.eos_id
        self.class0 = torch.arange(model.duration_classes, device=device) == 0
        k = vocab_out if spec.top_k <= 0 else min(spec.top_k, vocab_out)
        kd = model.duration_classes if spec.duration_top_k <= 0 else min(spec.duration_top_k, model.duration_classes)
        noise = lambda n: torch.ones(NOISE_CHUNK, batch, n, device=device)  # noqa: E731
        self.noise = None if _greedy(spec.top_k, spec.temperature) else noise(k)
        self.duration_noise = None if _greedy(spec.duration_top_k, spec.duration_temperature) else noise(kd)
        if spec.record:
            dtype = x_like.dtype
            self.trace_hidden = torch.zeros(batch, columns, model.llm_dim, device=device, dtype=dtype)
            self.trace_logits = torch.zeros(batch, columns, vocab_out, device=device, dtype=dtype)
            self.trace_durations = torch.zeros(batch, columns, model.duration_classes, device=device, dtype=dtype)

    def start(self, position: int, first_duration: torch.Tensor, min_len: torch.Tensor, max_len: torch.Tensor
              ) -> None:
        """(Re)initialise in place for a generation whose first step input sits at column ``position``. Token,
        duration and trace columns are all rewritten before they are read (up to each row's length)."""
        self.step.zero_()
        self.position.fill_(position)
        self.previous.copy_(first_duration.reshape(-1))
        self.min_len.copy_(min_len)
        self.max_len.copy_(max_len)
        self.lengths.zero_()
        self.finished.zero_()
        self.stopped_by_eos.zero_()

    def draw(self, generator: torch.Generator | None) -> None:
        """Fresh Exp(1) noise for the next NOISE_CHUNK steps, in place (outside the step: eager = compiled).
        Clamped away from 0 (p / 0 would be inf, or NaN for a p = 0 entry)."""
        for noise in (self.noise, self.duration_noise):
            if noise is not None:
                noise.exponential_(generator=generator).clamp_(min=torch.finfo(noise.dtype).tiny)

    def tensors(self) -> list[torch.Tensor]:
        out = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        return out + ([] if self.cache is None else self.cache.tensors())


def _noise_row(noise: torch.Tensor | None, step: torch.Tensor) -> torch.Tensor | None:
    return None if noise is None else noise.index_select(0, torch.remainder(step, NOISE_CHUNK)).squeeze(0)


def _heads(model: ARTTSModel, st: _DecodeState, spec: _StepSpec, hidden: torch.Tensor, first: bool) -> None:
    """Step i's decisions from its hidden state [B, D], all on the device: the duration of token i - 1 (not at
    the first step), token i (EOS masked while i < min_len), the finished flags, and the next LM input."""
    i = st.step
    if not first and spec.predict_durations:
        logits = model.duration_decoder(hidden)
        if spec.record:
            st.trace_durations.index_copy_(1, i - 1, logits.unsqueeze(1).to(st.trace_durations.dtype))
        logits = logits.masked_fill(st.class0, float("-inf"))  # class 0 is the start id, never a duration
        duration = _pick(logits, spec.duration_top_k, spec.duration_temperature, _noise_row(st.duration_noise, i))
        st.durations.index_copy_(1, i - 1, duration.unsqueeze(1))
        st.previous.copy_(duration)
    logits = model.llm_decoder(hidden)
    if spec.record:
        st.trace_hidden.index_copy_(1, i, hidden.unsqueeze(1).to(st.trace_hidden.dtype))
        st.trace_logits.index_copy_(1, i, logits.unsqueeze(1).to(st.trace_logits.dtype))
    logits = logits.masked_fill((i < st.min_len).unsqueeze(1) & st.eos_column, float("-inf"))
    token = _pick(logits, spec.top_k, spec.temperature, _noise_row(st.noise, i))
    st.tokens.index_copy_(1, i, token.unsqueeze(1))
    live = ~st.finished
    capped = i >= st.max_len  # this step only gave the last token's duration
    eos = (token == spec.eos_id) & ~capped & live
    done = (eos | capped) & live
    st.lengths.copy_(torch.where(done, i, st.lengths))
    st.stopped_by_eos.logical_or_(eos)
    st.finished.logical_or_(done)
    # EOS (after which nothing is kept) is clamped into the embedding's range
    st.x.copy_(model.speech_inputs(token.clamp(max=spec.vocab - 1).unsqueeze(1), st.previous.unsqueeze(1)))


def _decode_step(model: ARTTSModel, st: _DecodeState, spec: _StepSpec, window: int | None) -> None:
    """One token step against the static cache: identical shapes every step, no host read."""
    hidden = model.static_step(st.x, st.cache, st.position, window)
    _heads(model, st, spec, hidden, first=False)
    st.step.add_(1)
    st.position.add_(1)


_COMPILED: dict[str, Callable] = {}


def _compiled_step(device: torch.device) -> Callable:
    """``_decode_step`` under torch.compile, one per device type (dynamo caches per shapes and constants):
    CUDA: mode="reduce-overhead" (CUDA graph trees); elsewhere the default mode."""
    key = device.type
    if key not in _COMPILED:
        mode = "reduce-overhead" if key == "cuda" else None
        _COMPILED[key] = torch.compile(_decode_step, mode=mode)
    return _COMPILED[key]


def _check_config(cfg: SamplingConfig) -> None:
    if not isinstance(cfg.check_every, int) or cfg.check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {cfg.check_every!r}")
    if cfg.compile_step and not cfg.use_cache:
        raise ValueError("compile_step needs use_cache=True (it compiles the static-cache step)")


def _decode(model: ARTTSModel, prefix: torch.Tensor, offsets: torch.Tensor | None, first_duration: torch.Tensor,
            min_len: Sequence[int], max_len: Sequence[int], cfg: SamplingConfig,
            generator: torch.Generator | None, record: bool, predict_durations: bool = True):
    """Decode B rows from their LM prefixes [B, T, D] (left-padded by ``offsets`` [B] when given) -> (tokens
    [B, S], durations [B, S], lengths (host list), stopped_by_eos (host list), state); row b's result is the
    first lengths[b] columns. min_len / max_len: host ints per row."""
    _check_config(cfg)
    batch, t = prefix.shape[:2]
    spec = _StepSpec(model.eos_id, model.speech_token_size, cfg.top_k, cfg.temperature, cfg.duration_top_k,
                     cfg.duration_temperature, record, predict_durations)
    steps = max(max_len)  # step i <= steps; step i > 0 feeds position t - 1 + i
    columns = _round_up(t + steps, CACHE_BUCKET)
    device = prefix.device
    long = dict(device=device, dtype=torch.long)
    min_len_t, max_len_t = torch.tensor(list(min_len), **long), torch.tensor(list(max_len), **long)
    inputs = [prefix]
    reuse = cfg.compile_step if cfg.reuse_buffers is None else cfg.reuse_buffers
    if cfg.use_cache:
        out, prefix_cache = model.llm.forward_chunk(prefix, None, offsets)
        hidden = out[:, -1]
        kv = prefix_cache[0][0]
        key = (batch, columns, kv.dtype, prefix.dtype, kv.device, spec, offsets is None)
        kept = model.__dict__.get("_static_decode_buffers") if reuse else None
        if kept is not None and kept[0] == key:
            st = kept[1]
            st.cache.refresh(model.llm, offsets)
        else:
            model.__dict__.pop("_static_decode_buffers", None)  # free the previous generation's buffers first
            cache = StaticKVCache(model.llm, batch, columns, kv, offsets)
            st = _DecodeState(model, spec, batch, columns, prefix, cache)
            if reuse:
                model.__dict__["_static_decode_buffers"] = (key, st)
        st.cache.load(prefix_cache)
        del prefix_cache
    else:
        if offsets is not None:
            raise ValueError("use_cache=False decodes one utterance at a time")
        hidden = _full_recompute(model, inputs)
        st = _DecodeState(model, spec, batch, columns, prefix, None)
    st.start(t, first_duration.to(device=device, dtype=torch.long), min_len_t, max_len_t)
    st.draw(generator)
    _heads(model, st, spec, hidden, first=True)
    st.step.add_(1)
    if cfg.compile_step:
        step_fn = _compiled_step(device)
        if device.type == "cuda":
            for x in st.tensors():  # fixed addresses: CUDA graphs replay in place
                torch._dynamo.mark_static_address(x)
    else:
        step_fn = _decode_step
    for i in range(1, steps + 1):
        if i % NOISE_CHUNK == 0:
            st.draw(generator)
        if not cfg.use_cache:
            inputs.append(st.x.clone())
            _heads(model, st, spec, _full_recompute(model, inputs), first=False)
            st.step.add_(1)
        elif cfg.compile_step:
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            step_fn(model, st, spec, None)
        else:
            step_fn(model, st, spec, min(columns, _round_up(t + i, WINDOW_BUCKET)))
        if i % cfg.check_every == 0 and i < steps and bool(st.finished.all()):  # the only per-step host read
            break
    lengths, stopped = torch.stack([st.lengths, st.stopped_by_eos.long()]).tolist()  # one read at the end
    return st.tokens, st.durations, lengths, [bool(s) for s in stopped], st


def _length_limits(num_text: int, cfg: SamplingConfig, min_tokens: int = 0) -> tuple[int, int]:
    """(min_len, max_len) tokens for a target text of ``num_text`` ids: the cap is ratio x text length (and
    ``max_tokens``); EOS is masked below ratio x text length or ``min_tokens``, never above the cap."""
    max_len = int(num_text * cfg.max_token_text_ratio)
    if cfg.max_tokens is not None:
        max_len = min(max_len, cfg.max_tokens)
    return min(max(int(num_text * cfg.min_token_text_ratio), int(min_tokens)), max_len), max_len


def release_decode_buffers(model: ARTTSModel) -> None:
    """Drop the static buffers that ``reuse_buffers`` / ``compile_step`` keep on the model."""
    model.__dict__.pop("_static_decode_buffers", None)


@torch.inference_mode()
def generate(model: ARTTSModel, text: torch.Tensor, framerate: float | None,
             prompt_text: torch.Tensor | None = None, prompt_tokens: torch.Tensor | None = None,
             prompt_durations: torch.Tensor | None = None, config: SamplingConfig | None = None,
             generator: torch.Generator | None = None, record: bool = False,
             min_tokens: int = 0) -> GenerationResult:
    """Generate speech tokens and durations for one utterance.

    text [1, L] target text ids (language token first); prompt_text [1, Lp] the prompt's transcript ids,
    prepended to the text; prompt_tokens/prompt_durations [1, P] the prompt audio's tokens at the
    same threshold ``framerate`` (see ``encode_prompt``). min_tokens: EOS is masked before this many tokens
    (besides ``min_token_text_ratio``; capped by the maximum length). record=True: ``trace`` holds the
    per-step hidden states and token logits (every step that sampled a token, EOS included), the duration
    logits (one per token) and the prefix's LM input.
    """
    cfg = config or SamplingConfig()
    if model.training:
        raise RuntimeError("call model.eval() before generate(): dropout would make decoding random")
    if text.dim() != 2 or text.size(0) != 1:
        raise ValueError(f"text must be [1, L] ids, got shape {tuple(text.shape)}")
    _check_config(cfg)
    full_text = text if prompt_text is None else torch.cat([prompt_text, text], dim=1)
    prefix = model.decode_prefix(full_text, framerate, prompt_tokens, prompt_durations)
    min_len, max_len = _length_limits(text.size(1), cfg, min_tokens)
    device = text.device
    if max_len <= 0:
        empty = torch.zeros(1, 0, dtype=torch.long, device=device)
        trace = {"step_logits": torch.empty(0), "step_duration_logits": torch.empty(0),
                 "step_hidden": torch.empty(0), "prefix_lm_input": prefix} if record else {}
        return GenerationResult(empty, empty.clone(), False, trace)
    # conditioning for the first token: the last prompt token's duration, or "start" (0); kept on the device
    first = torch.zeros(1, dtype=torch.long, device=device)
    if prompt_tokens is not None and prompt_tokens.numel() and model.use_duration_conditioning:
        first = prompt_durations[0, -1:].to(device=device, dtype=torch.long)
    tokens, durations, (n,), (stopped,), st = _decode(model, prefix, None, first, [min_len], [max_len], cfg,
                                                      generator, record)
    trace = {}
    if record:  # steps 0..n sampled a token if EOS stopped, 0..n-1 if the cap did; n duration predictions
        sampled = n + 1 if stopped else n
        trace = {"step_logits": st.trace_logits[0, :sampled], "step_duration_logits": st.trace_durations[0, :n],
                 "step_hidden": st.trace_hidden[0, :sampled]}
        trace = {k: v.clone() if v.size(0) else torch.empty(0) for k, v in trace.items()}
        trace["prefix_lm_input"] = prefix
    return GenerationResult(tokens[:, :n].clone(), durations[:, :n].clone(), stopped, trace)


@torch.inference_mode()
def generate_fixed_rate(model: ARTTSModel, text: torch.Tensor, framerate: float | None,
                        prompt_tokens: torch.Tensor | None, prompt_durations: torch.Tensor | None,
                        config: SamplingConfig | None = None, generator: torch.Generator | None = None,
                        min_tokens: int = 0) -> GenerationResult:
    """The official ``predict_duration=False`` decode of one utterance: no duration head, prompt tokens without
    duration embeddings, every generated token conditioned on the last prompt token's duration (the official
    never updates it); returned durations are all 1. text [1, L] (prompt text included), prompt [1, P].
    The same device-side loop as `generate`, with the duration head off."""
    cfg = config or SamplingConfig()
    _check_config(cfg)
    device = text.device
    prefix = model.decode_prefix(text, framerate)
    first = torch.zeros(1, dtype=torch.long, device=device)  # the "start" duration id when there is no prompt
    if prompt_tokens is not None and prompt_tokens.numel():
        prefix = torch.cat([prefix, model.speech_inputs(prompt_tokens, None).to(prefix.dtype)], dim=1)
        if model.use_duration_conditioning:
            first = prompt_durations[0, -1:].to(device=device, dtype=torch.long)
    min_len, max_len = _length_limits(text.size(1), cfg, min_tokens)
    if max_len <= 0:
        empty = torch.zeros(1, 0, dtype=torch.long, device=device)
        return GenerationResult(empty, empty.clone(), False, {})
    tokens, _, (n,), (stopped,), _ = _decode(model, prefix, None, first, [min_len], [max_len], cfg, generator,
                                             False, predict_durations=False)
    out = tokens[:, :n].clone()
    return GenerationResult(out, torch.ones_like(out), stopped, {})


Rows = Sequence[torch.Tensor | None] | torch.Tensor | None


def _rows(value: Rows, lengths: torch.Tensor | Sequence[int] | None, batch: int, name: str
          ) -> list[torch.Tensor | None]:
    """A list of [1, L] / [L] tensors (None = absent), or a padded [B, L] tensor with optional lengths
    -> B one-dimensional tensors or None."""
    if value is None:
        return [None] * batch
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or value.size(0) != batch:
            raise ValueError(f"{name}: a padded tensor must be [{batch}, L], got {tuple(value.shape)}")
        n = [value.size(1)] * batch if lengths is None else [int(x) for x in lengths]
        return [value[b, : n[b]] for b in range(batch)]
    if lengths is not None:
        raise ValueError(f"{name}: lengths only go with a padded tensor")
    if len(value) != batch:
        raise ValueError(f"{name}: {len(value)} entries for {batch} utterances")
    out = []
    for v in value:
        if v is not None and not (v.dim() == 1 or (v.dim() == 2 and v.size(0) == 1)):
            raise ValueError(f"{name}: entries must be [1, L] or [L], got {tuple(v.shape)}")
        out.append(None if v is None else v.reshape(-1))
    return out


def _batch_prefix(model: ARTTSModel, texts: list[torch.Tensor], framerate, prompt_tokens, prompt_durations
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded LM prefixes [B, T, D] (item b in columns offsets[b]..T-1, the layout ``decode_prefix``
    builds for it alone) and offsets [B]. The text encoder runs once on the right-padded texts (causal:
    padding after an item does not change it)."""
    b, device = len(texts), texts[0].device
    text_lengths = torch.tensor([t.numel() for t in texts], device=device)
    padded = torch.zeros(b, max(t.numel() for t in texts), dtype=torch.long, device=device)
    for i, t in enumerate(texts):  # setup only, once per call
        padded[i, : t.numel()] = t
    _, text_emb = model.encode_text(padded, text_lengths)
    dtype = text_emb.dtype
    if isinstance(framerate, (list, tuple)):
        framerate = torch.tensor([float(f) for f in framerate])
    slots = model.framerate_slot(framerate, b, device).to(dtype)
    sos, task = (model.llm_embedding.weight[i].view(1, -1).to(dtype) for i in (0, 1))
    rows = []
    for i in range(b):
        pieces = [sos, slots[i], text_emb[i, : texts[i].numel()], task]
        tokens = prompt_tokens[i]
        if tokens is not None and tokens.numel():
            previous = None
            if model.use_duration_conditioning:
                durs = prompt_durations[i]
                if durs is None or durs.shape != tokens.shape:
                    raise ValueError(f"utterance {i}: prompt_durations [P] are required with duration conditioning")
                previous = F.pad(durs[:-1], (1, 0)).unsqueeze(0)
            pieces.append(model.speech_inputs(tokens.unsqueeze(0), previous)[0].to(dtype))
        rows.append(torch.cat(pieces, dim=0))
    total = max(r.size(0) for r in rows)
    prefix = torch.zeros(b, total, model.llm_dim, device=device, dtype=dtype)
    offsets = torch.tensor([total - r.size(0) for r in rows], device=device)
    for i, r in enumerate(rows):
        prefix[i, total - r.size(0):] = r
    return prefix, offsets


@torch.inference_mode()
def generate_batch(model: ARTTSModel, texts: Rows, framerate: float | Sequence[float] | torch.Tensor | None,
                   prompt_texts: Rows = None, prompt_tokens: Rows = None, prompt_durations: Rows = None,
                   config: SamplingConfig | None = None, generator: torch.Generator | None = None, *,
                   text_lengths=None, prompt_text_lengths=None, prompt_lengths=None,
                   min_tokens: Sequence[int] | None = None) -> list[GenerationResult]:
    """``generate`` for B utterances at once -> B results, in order.

    texts: B target-text id tensors [1, L_b] (or [L_b]), or a padded [B, L] tensor with ``text_lengths``;
    prompt_texts / prompt_tokens / prompt_durations: the same forms (list entries may be None: no prompt),
    padded with ``prompt_text_lengths`` / ``prompt_lengths``; framerate: one threshold or one per item.

    The prefixes are left-padded so that all items append their next position in the same cache column;
    rel-pos attention with a key-padding mask (``forward_chunk(offsets=...)``, then the static cache's
    offsets) makes this exact. Each item keeps its own length limits (from its own text length) and stops at
    EOS or its cap (plus the one extra step for the last duration, as ``generate``); finished rows keep
    running (fixed shapes) until every row has finished, and what they decode after is dropped. Always uses
    the KV cache; a batch of one draws what ``generate`` draws with the same generator.
    """
    cfg = config or SamplingConfig()
    if model.training:
        raise RuntimeError("call model.eval() before generate_batch(): dropout would make decoding random")
    if isinstance(texts, torch.Tensor):
        batch = texts.size(0) if texts.dim() == 2 else -1
    else:
        batch = len(texts)
    if batch <= 0:
        raise ValueError("texts: need at least one utterance ([B, L] tensor or a list of [1, L] tensors)")
    if not cfg.use_cache:
        raise ValueError("generate_batch always uses the KV cache (use_cache=False: call generate per utterance)")
    _check_config(cfg)
    texts_ = _rows(texts, text_lengths, batch, "texts")
    prompt_texts_ = _rows(prompt_texts, prompt_text_lengths, batch, "prompt_texts")
    prompt_tokens_ = _rows(prompt_tokens, prompt_lengths, batch, "prompt_tokens")
    prompt_durations_ = _rows(prompt_durations, prompt_lengths, batch, "prompt_durations")
    device = texts_[0].device
    full = [t if p is None else torch.cat([p, t]) for t, p in zip(texts_, prompt_texts_)]
    prefix, offsets = _batch_prefix(model, full, framerate, prompt_tokens_, prompt_durations_)

    # limits from host sizes (no device read); min_tokens: per-item floors (e.g. from the prompt's speaking rate)
    floors = [0] * batch if min_tokens is None else list(min_tokens)
    if len(floors) != batch:
        raise ValueError(f"min_tokens: {len(floors)} entries for {batch} utterances")
    min_len, max_len = (list(v) for v in zip(*(_length_limits(t.numel(), cfg, f) for t, f in zip(texts_, floors))))
    # conditioning of the first token: the last prompt token's duration, or "start" (0); kept on the device
    first = []
    for b in range(batch):
        d = prompt_durations_[b]
        has_prompt = prompt_tokens_[b] is not None and prompt_tokens_[b].numel()
        if has_prompt and model.use_duration_conditioning:
            first.append(d[-1:].to(device=device, dtype=torch.long))
        else:
            first.append(torch.zeros(1, dtype=torch.long, device=device))
    if max(max_len) <= 0:
        empty = torch.zeros(1, 0, dtype=torch.long, device=device)
        return [GenerationResult(empty.clone(), empty.clone(), False, {}) for _ in range(batch)]
    tokens, durations, n, stopped, _ = _decode(model, prefix, offsets, torch.cat(first), min_len, max_len, cfg,
                                               generator, record=False)
    return [GenerationResult(tokens[b: b + 1, : n[b]].clone(), durations[b: b + 1, : n[b]].clone(), stopped[b], {})
            for b in range(batch)]


@torch.no_grad()
def encode_prompt(codec, audio: torch.Tensor, lengths: torch.Tensor, threshold: float,
                  semantic_features: torch.Tensor | None = None, semantic_lengths: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt audio [1, N] -> (tokens [1, P], durations [1, P]) at the generation threshold (fixes B1)."""
    out = codec.encode(audio, lengths, threshold=threshold, num_quantizers=1,
                       semantic_features=semantic_features, semantic_lengths=semantic_lengths)
    n = int(out.num_tokens[0])
    codes = out.semantic_codes
    codes = codes[:, 0] if codes.dim() == 3 else codes
    return codes[:1, :n].long(), out.token_lengths[:1, :n].long()
