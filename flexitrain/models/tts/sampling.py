"""Decoding for the AR text-to-token model: top-k/temperature for tokens, separate top-k/temperature for
durations, key/value cache, prompt continuation, EOS or a length cap.

Differences from the official ``TransformerLM.inference`` (tts.md §1.7, §7), all deliberate:
- the prompt is tokenised at the *generation* threshold (``encode_prompt``), not always at 0.91 (bug B1);
- every generated token gets a duration: when the length cap stops decoding, one more LM step predicts the
  last token's duration (the original returns one duration fewer, bug B4);
- duration class 0 (the "no previous token" id, never a target) is never sampled;
- EOS before ``min_len`` is masked out before top-k instead of rejection sampling.
With top_k=1 and duration_top_k=1 the tokens equal the original's greedy output (tested).

``generate_batch`` decodes several utterances together (left-padded prefixes, one KV cache); with greedy
settings it returns what ``generate`` returns for each utterance alone (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from flexitrain.models.tts.ar_tts import ARTTSModel


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


@dataclass
class GenerationResult:
    tokens: torch.Tensor        # [1, N] speech tokens (EOS excluded)
    durations: torch.Tensor     # [1, N] duration classes (12.5 Hz frames per token)
    stopped_by_eos: bool
    trace: dict = field(default_factory=dict)  # with record=True: per-step logits / hidden states


def _sample(logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator | None) -> int:
    """logits [V] -> one id: greedy when top_k == 1 or temperature == 0, else top-k multinomial."""
    if top_k == 1 or temperature <= 0:
        return int(logits.argmax())
    if temperature != 1.0:
        logits = logits / temperature
    k = logits.size(-1) if top_k <= 0 else min(top_k, logits.size(-1))
    values, indices = logits.topk(k)
    choice = torch.multinomial(torch.softmax(values.float(), -1), 1, generator=generator)
    return int(indices[choice])


def _full_recompute(model: ARTTSModel, inputs: list[torch.Tensor]) -> torch.Tensor:
    seq = torch.cat(inputs, dim=1)
    return model.llm(seq, torch.tensor([seq.size(1)], device=seq.device))[:, -1]


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
    (besides ``min_token_text_ratio``; capped by the maximum length).
    """
    cfg = config or SamplingConfig()
    if model.training:
        raise RuntimeError("call model.eval() before generate(): dropout would make decoding random")
    if text.dim() != 2 or text.size(0) != 1:
        raise ValueError(f"text must be [1, L] ids, got shape {tuple(text.shape)}")
    full_text = text if prompt_text is None else torch.cat([prompt_text, text], dim=1)
    prefix = model.decode_prefix(full_text, framerate, prompt_tokens, prompt_durations)
    max_len = int(text.size(1) * cfg.max_token_text_ratio)
    if cfg.max_tokens is not None:
        max_len = min(max_len, cfg.max_tokens)
    min_len = min(max(int(text.size(1) * cfg.min_token_text_ratio), int(min_tokens)), max_len)

    previous_duration = 0  # conditioning for the first token: the last prompt token's duration, or "start"
    if prompt_tokens is not None and prompt_tokens.numel() and model.use_duration_conditioning:
        previous_duration = int(prompt_durations[0, -1])

    trace = {"step_logits": [], "step_duration_logits": [], "step_hidden": []} if record else {}
    tokens: list[int] = []
    durations: list[int] = []
    cache, inputs, new_input = None, [prefix], prefix
    stopped = False

    def advance(new_input):
        nonlocal cache
        if cfg.use_cache:
            hidden, cache = model.step(new_input, cache)
            return hidden
        return _full_recompute(model, inputs)

    def predict_duration(hidden) -> int:
        logits = model.duration_decoder(hidden)[0]
        if record:
            trace["step_duration_logits"].append(logits)
        logits = logits.clone()
        logits[0] = float("-inf")  # class 0 is the start id, never a duration
        return _sample(logits, cfg.duration_top_k, cfg.duration_temperature, generator)

    for i in range(max_len):
        hidden = advance(new_input)
        if record:
            trace["step_hidden"].append(hidden[0])
        if i > 0:  # the hidden state of the token fed last predicts its duration
            previous_duration = predict_duration(hidden)
            durations.append(previous_duration)
        logits = model.llm_decoder(hidden)[0]
        if record:
            trace["step_logits"].append(logits)
        if i < min_len:
            logits = logits.clone()
            logits[model.eos_id] = float("-inf")
        token = _sample(logits, cfg.top_k, cfg.temperature, generator)
        if token == model.eos_id:
            stopped = True
            break
        tokens.append(token)
        cond = torch.tensor([[previous_duration]], device=text.device)
        new_input = model.speech_inputs(torch.tensor([[token]], device=text.device), cond).to(prefix.dtype)
        inputs.append(new_input)
    if len(durations) < len(tokens):  # stopped by the length cap: one more step for the last duration
        durations.append(predict_duration(advance(new_input)))
    if record:
        trace = {k: torch.stack(v) if v else torch.empty(0) for k, v in trace.items()}
        trace["prefix_lm_input"] = prefix
    device = text.device
    return GenerationResult(torch.tensor([tokens], dtype=torch.long, device=device).view(1, -1),
                            torch.tensor([durations], dtype=torch.long, device=device).view(1, -1),
                            stopped, trace)


def _sample_rows(logits: torch.Tensor, top_k: int, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """logits [N, V] -> ids [N]: ``_sample`` row by row in one call (greedy rows give identical ids)."""
    if top_k == 1 or temperature <= 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    k = logits.size(-1) if top_k <= 0 else min(top_k, logits.size(-1))
    values, indices = logits.topk(k, dim=-1)
    choice = torch.multinomial(torch.softmax(values.float(), -1), 1, generator=generator)
    return indices.gather(-1, choice).squeeze(-1)


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
    padded = torch.zeros(b, int(text_lengths.max()), dtype=torch.long, device=device)
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
    rel-pos attention with a key-padding mask (``forward_chunk(offsets=...)``) makes this exact. Each item
    keeps its own length limits (from its own text length) and stops at EOS or its cap (plus the one extra
    step for the last duration, as ``generate``); finished items leave the batch and the cache, and
    columns that became padding for every remaining item are dropped. Always uses the KV cache; with
    random sampling the draws differ from ``generate``'s (one multinomial per step for the whole batch).
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
    texts_ = _rows(texts, text_lengths, batch, "texts")
    prompt_texts_ = _rows(prompt_texts, prompt_text_lengths, batch, "prompt_texts")
    prompt_tokens_ = _rows(prompt_tokens, prompt_lengths, batch, "prompt_tokens")
    prompt_durations_ = _rows(prompt_durations, prompt_lengths, batch, "prompt_durations")
    device = texts_[0].device
    full = [t if p is None else torch.cat([p, t]) for t, p in zip(texts_, prompt_texts_)]
    prefix, offsets = _batch_prefix(model, full, framerate, prompt_tokens_, prompt_durations_)

    target_lengths = torch.tensor([t.numel() for t in texts_])
    max_len = (target_lengths * cfg.max_token_text_ratio).long()  # int() of a non-negative float
    if cfg.max_tokens is not None:
        max_len = max_len.clamp(max=cfg.max_tokens)
    min_len = (target_lengths * cfg.min_token_text_ratio).long()
    if min_tokens is not None:  # per-item floors (e.g. from the prompt's speaking rate), never above the cap
        min_len = torch.maximum(min_len, torch.as_tensor(list(min_tokens), dtype=torch.long))
    min_len = torch.minimum(min_len, max_len).to(device)
    max_len = max_len.to(device)
    previous = [0] * batch  # conditioning of the first token: the last prompt token's duration, or "start"
    for b in range(batch):
        if prompt_tokens_[b] is not None and prompt_tokens_[b].numel() and model.use_duration_conditioning:
            previous[b] = int(prompt_durations_[b][-1])
    previous_duration = torch.tensor(previous, device=device)

    cap = int(max_len.max())
    tokens_out = torch.zeros(batch, cap + 1, dtype=torch.long, device=device)
    durations_out = torch.zeros(batch, cap + 1, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)
    cache, new_input, i = None, prefix, 0
    while active.numel():
        out, cache = model.llm.forward_chunk(new_input, cache, offsets)
        hidden = out[:, -1]
        if i > 0:  # the hidden state of the token fed last predicts its duration
            logits = model.duration_decoder(hidden).clone()
            logits[:, 0] = float("-inf")  # class 0 is the start id, never a duration
            previous_duration = _sample_rows(logits, cfg.duration_top_k, cfg.duration_temperature, generator)
            durations_out[active, i - 1] = previous_duration
        logits = model.llm_decoder(hidden)
        early = i < min_len[active]
        if bool(early.any()):
            logits = logits.clone()
            logits[early, model.eos_id] = float("-inf")
        token = _sample_rows(logits, cfg.top_k, cfg.temperature, generator)
        capped = max_len[active] <= i  # stopped by the length cap: this step only gave the last duration
        eos = (token == model.eos_id) & ~capped
        done = capped | eos
        tokens_out[active, i] = token
        if bool(done.any()):
            lengths[active[done]] = i
            stopped[active[eos]] = True
            keep = ~done
            active, offsets = active[keep], offsets[keep]
            token, previous_duration = token[keep], previous_duration[keep]
            cache = [(k[keep], v[keep]) for k, v in cache]
            if active.numel():
                drop = int(offsets.min())  # leading columns that are padding for every remaining item
                if drop:
                    cache = [(k[:, :, drop:], v[:, :, drop:]) for k, v in cache]
                    offsets = offsets - drop
        new_input = model.speech_inputs(token.unsqueeze(1), previous_duration.unsqueeze(1)).to(prefix.dtype)
        i += 1
    n = lengths.tolist()
    done_by_eos = stopped.tolist()
    return [GenerationResult(tokens_out[b: b + 1, : n[b]].clone(), durations_out[b: b + 1, : n[b]].clone(),
                             done_by_eos[b], {}) for b in range(batch)]


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
