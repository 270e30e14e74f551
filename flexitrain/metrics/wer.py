"""Word and character error rates (jiwer) on normalised text.

Corpus-level rates are pooled: total edits / total reference units, which is what jiwer
returns for a list of sentences. Per-utterance rates are also available for tables.
With ``normalize=False`` the numbers equal ``jiwer.wer`` / ``jiwer.cer`` on the same strings.
CER counts spaces as characters (jiwer's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jiwer

from .text_norm import normalize_text

__all__ = ["ErrorCounts", "error_counts", "word_error_rate", "char_error_rate", "utterance_error_rates"]


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts; ``rate = (S + D + I) / (S + D + H)`` (H = hits, so S + D + H = reference length)."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_length(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        """Error rate; NaN for an empty reference with an empty hypothesis, inf if only insertions."""
        n = self.reference_length
        if n == 0:
            return float("nan") if self.errors == 0 else float("inf")
        return self.errors / n

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                           self.insertions + other.insertions, self.hits + other.hits)


def _as_list(x: str | Sequence[str], name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    out = list(x)
    if not all(isinstance(s, str) for s in out):
        raise TypeError(f"{name} must be a str or a sequence of str")
    return out


def _prepare(references, hypotheses, normalize: bool | Callable[[str], str]):
    refs, hyps = _as_list(references, "references"), _as_list(hypotheses, "hypotheses")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    norm = normalize_text if normalize is True else (normalize or None)
    if norm is not None:
        refs, hyps = [norm(r) for r in refs], [norm(h) for h in hyps]
    return refs, hyps


def error_counts(references: str | Sequence[str], hypotheses: str | Sequence[str],
                 unit: str = "word", normalize: bool | Callable[[str], str] = True) -> ErrorCounts:
    """Pooled edit counts over all pairs; ``unit`` is ``"word"`` or ``"char"``.

    ``normalize`` is True (use :func:`normalize_text`), False, or a custom callable.
    """
    refs, hyps = _prepare(references, hypotheses, normalize)
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    if not refs:
        return ErrorCounts()
    fn = jiwer.process_words if unit == "word" else jiwer.process_characters
    # jiwer rejects a list where every reference is empty; count those pairs by hand.
    keep = [i for i, r in enumerate(refs) if r.strip()]
    empty = [h for r, h in zip(refs, hyps) if not r.strip()]
    extra = sum(len(h.split()) if unit == "word" else len(h) for h in empty)
    counts = ErrorCounts(insertions=extra)
    if keep:
        o = fn([refs[i] for i in keep], [hyps[i] for i in keep])
        counts = counts + ErrorCounts(o.substitutions, o.deletions, o.insertions, o.hits)
    return counts


def word_error_rate(references, hypotheses, normalize: bool | Callable[[str], str] = True) -> float:
    """Corpus WER (pooled over sentences)."""
    return error_counts(references, hypotheses, "word", normalize).rate


def char_error_rate(references, hypotheses, normalize: bool | Callable[[str], str] = True) -> float:
    """Corpus CER (pooled over sentences, spaces count as characters)."""
    return error_counts(references, hypotheses, "char", normalize).rate


def utterance_error_rates(reference: str, hypothesis: str,
                          normalize: bool | Callable[[str], str] = True) -> dict[str, float]:
    """``{"wer", "cer", "ref_words", "word_errors"}`` for one pair (for per-utterance tables)."""
    w = error_counts(reference, hypothesis, "word", normalize)
    c = error_counts(reference, hypothesis, "char", normalize)
    return {"wer": w.rate, "cer": c.rate, "ref_words": float(w.reference_length), "word_errors": float(w.errors)}
