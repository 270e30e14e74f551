"""Decoding for the AR text-to-token model: top-k/temperature for tokens, separate top-k/temperature for
durations, key/value cache, prompt continuation, EOS or a length cap.

Differences from the official ``TransformerLM.inference`` (tts.md §1.7, §7), all deliberate:
- the prompt is tokenised at the *generation* threshold (``encode_prompt``), not always at 0.91 (bug B1);
- every generated token gets a duration: when the length cap stops decoding, one more LM step predicts the
  last token's duration (the original returns one duration fewer, bug B4);
- duration class 0 (the "no previous token" id, never a target) is never sampled;
- EOS before ``min_len`` is masked out before top-k instead of rejection sampling.
With top_k=1 and duration_top_k=1 the tokens equal the original's greedy output (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
             generator: torch.Generator | None = None, record: bool = False) -> GenerationResult:
    """Generate speech tokens and durations for one utterance.

    text [1, L] target text ids (language token first); prompt_text [1, Lp] the prompt's transcript ids,
    prepended to the text; prompt_tokens/prompt_durations [1, P] the prompt audio's tokens at the
    same threshold ``framerate`` (see ``encode_prompt``).
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
    min_len = int(text.size(1) * cfg.min_token_text_ratio)

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
