"""Whisper multilingual byte-level BPE (the AR model's text vocabulary), built offline from the tiktoken file
that ships inside the ``openai-whisper`` package — nothing is downloaded.

The official model uses ``whisper.tokenizer.get_tokenizer(multilingual=True)`` (99 languages: 51,865 ids;
the model's embedding has 51,866 rows) and feeds ``[<|lang|>] + bpe(text)``. Only whisper's small
``tokenizer.py`` is loaded (not the ``whisper`` package, which would import its model code).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

from flexitrain.text.phonemize import MANDARIN, Phonemizer

NUM_LANGUAGES = 99  # whisper's default; the official AR tokenizer


@lru_cache(maxsize=None)
def _whisper_tokenizer_module():
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Whisper BPE needs the openai-whisper package (its tiktoken assets): "
                          "pip install --no-deps openai-whisper && pip install tiktoken")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_flexitrain_whisper_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # dataclasses need the module registered
    mod_spec.loader.exec_module(module)
    return module


class WhisperTextTokenizer:
    """``encode(text, language)`` -> ``[<|language|>] + BPE ids``; ``decode`` inverts the BPE part."""

    def __init__(self, num_languages: int = NUM_LANGUAGES):
        wt = _whisper_tokenizer_module()
        self.languages = list(wt.LANGUAGES)[:num_languages]
        self.encoding = wt.get_encoding("multilingual", num_languages=num_languages)
        self.vocab_size = self.encoding.n_vocab  # 51865 with 99 languages

    @staticmethod
    def whisper_code(language: str) -> str:
        """"en-us" / "en_GB" / "EN" -> "en" (whisper codes are bare ISO 639-1)."""
        return language.replace("_", "-").split("-")[0].lower()

    def language_token(self, language: str) -> int:
        language = self.whisper_code(language)
        if language not in self.languages:
            raise ValueError(f"unknown language {language!r}: whisper language codes are {self.languages}")
        return self.encoding.encode_single_token(f"<|{language}|>")

    def encode(self, text: str, language: str = "en") -> list[int]:
        return [self.language_token(language)] + self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], languages: str | list[str] = "en") -> list[list[int]]:
        langs = [languages] * len(texts) if isinstance(languages, str) else list(languages)
        bpe = self.encoding.encode_ordinary_batch(texts, num_threads=1)
        return [[self.language_token(lang)] + ids for lang, ids in zip(langs, bpe)]

    def decode(self, ids: list[int]) -> str:
        """BPE ids -> text; special tokens (language etc.) are dropped."""
        return self.encoding.decode([i for i in ids if i < self.encoding.eot_token])


ZH_G2P_MODES = ("hanzi", "pinyin")


class TextFrontend:
    """Text -> model ids: optional G2P (full, as at official inference) then the Whisper BPE.

    G2P per language: espeak-ng IPA for the languages in ``phonemize.ESPEAK_VOICES``; Chinese ("zh") per
    ``zh_g2p``: "hanzi" (default) feeds the characters themselves to the BPE, which is what the official
    training data pipeline does (its G2P step only touches en/fr samples; a checkpoint trained that way
    expects hanzi), "pinyin" converts them to tone-numbered pinyin with pypinyin (for models trained so; use
    the same setting for training and inference). Any other language raises (see ``phonemize.unsupported``).

    The official *inference* code phonemises every language with the en-us espeak voice, which turns each
    hanzi into "Chinese letter"; that is a bug, not followed here.

    ``g2p_prob`` < 1 keeps the raw text for that share of calls (a training-time augmentation; the
    official training policy is unknown, inference is always full G2P). Phonemes are cached.
    """

    def __init__(self, g2p: bool = True, g2p_prob: float = 1.0, shorten: bool = True, seed: int = 0,
                 zh_g2p: str = "hanzi"):
        import random

        if zh_g2p not in ZH_G2P_MODES:
            raise ValueError(f"zh_g2p must be one of {ZH_G2P_MODES}, got {zh_g2p!r}")
        self.tokenizer = WhisperTextTokenizer()
        self.phonemizer = Phonemizer(shorten=shorten) if g2p else None
        self.g2p_prob = g2p_prob
        self.zh_g2p = zh_g2p
        self._rng = random.Random(seed)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _phonemise(self, language: str) -> bool:
        """Whether this language goes through the phonemizer (raises for a language without a reliable G2P)."""
        voice = self.phonemizer.voice_for(language)
        return voice != MANDARIN or self.zh_g2p == "pinyin"

    def text_for_model(self, texts: list[str], languages: str | list[str] = "en") -> list[str]:
        if self.phonemizer is None or self.g2p_prob <= 0:
            return list(texts)
        langs = [languages] * len(texts) if isinstance(languages, str) else list(languages)
        if len(langs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(langs)} languages")
        use = [self._phonemise(l) and (self.g2p_prob >= 1 or self._rng.random() < self.g2p_prob) for l in langs]
        phon = self.phonemizer.phonemize_batch([t for t, u in zip(texts, use) if u],
                                               [l for l, u in zip(langs, use) if u])
        it = iter(phon)
        return [next(it) if u else t for t, u in zip(texts, use)]

    def __call__(self, texts: list[str] | str, languages: str | list[str] = "en") -> list[list[int]]:
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = self.tokenizer.encode_batch(self.text_for_model(texts, languages), languages)
        return ids[0] if single else ids
