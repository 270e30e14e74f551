"""espeak-ng IPA phonemisation through libespeak-ng (ctypes), as the official pipeline does via phonemizer's
``EspeakBackend(lang, preserve_punctuation=True, with_stress=False, language_switch="remove-flags")``.

Punctuation is cut out, each span between marks is phonemised on its own and the marks are put back, so
"hello world, this is a test." gives "həloʊ wɜːld, ðɪs ɪz ɐ tɛst.". Results are cached per (voice, text).
libespeak-ng keeps global state, so every call holds one process-wide lock.

Only languages with a G2P that reads ordinary text correctly are accepted; any other raises a ValueError
naming it and the supported ones (no silent nonsense). Mandarin ("zh") goes through pypinyin
(`flexitrain.text.mandarin`), not espeak-ng, whose cmn voice here reads hanzi as English-spelled pinyin.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import threading
from collections import OrderedDict

# whisper language code -> espeak-ng voice, for the languages whose voice reads plain text correctly (checked
# by hand on libespeak-ng 1.51). Left out on purpose: zh (cmn reads pinyin as English: see MANDARIN), ja
# (kanji come out as "Chinese letter"), ar (needs diacritised text; plain text loses its vowels).
ESPEAK_VOICES = {
    "en": "en-us", "de": "de", "fr": "fr-fr", "es": "es", "it": "it", "pt": "pt", "nl": "nl", "pl": "pl",
    "ru": "ru", "ko": "ko", "tr": "tr", "sv": "sv", "fi": "fi", "cs": "cs", "hi": "hi", "hu": "hu", "el": "el",
    "da": "da", "ca": "ca", "uk": "uk", "vi": "vi",
}
MANDARIN = "zh"  # whisper's code for Chinese; G2P = tone-numbered pinyin (flexitrain.text.mandarin)
SUPPORTED_LANGUAGES = tuple(sorted([*ESPEAK_VOICES, MANDARIN]))


def base_language(language: str) -> str:
    """"en-us" / "zh_CN" / "EN" -> "en" / "zh" / "en"."""
    return language.replace("_", "-").split("-")[0].lower()


def unsupported(language: str) -> ValueError:
    return ValueError(f"no reliable G2P for language {language!r}: supported are {', '.join(SUPPORTED_LANGUAGES)} "
                      "(or pass g2p=False to feed the raw text to the BPE, as the official pipeline does for "
                      "languages other than en/fr)")


# phonemizer's default punctuation marks
_PUNCTUATION = ';:,.!?¡¿—…"«»“”(){}[]'
_PUNCT_RE = re.compile(r"(\s*[" + re.escape(_PUNCTUATION) + r"]+\s*)")
_STRESS_RE = re.compile(r"[ˈˌ'\-]+")
_FLAGS_RE = re.compile(r"\([^)]*\)")

# IPA -> cheaper BPE characters (official ``shorten_sequence``; order matters: ɚ -> ər before ɜ -> ə)
SHORTEN_MAP = [("ː", "~"), ("ʌ", "α"), ("ɑ", "α"), ("ɪ", "ι"), ("ʊ", "υ"), ("ɹ", "r"), ("ɐ", "a"),
               ("ʃ", "ρ"), ("ɛ", "ε"), ("ŋ", "ng"), ("ɡ", "g"), ("ɔ", "ο"), ("ʒ", "ψ"), ("ɾ", "τ"),
               ("ɚ", "ər"), ("ᵻ", "i"), ("ɜ", "ə")]


def shorten_ipa(ipa: str) -> str:
    """Map IPA symbols to the short BPE-friendly alphabet of the official G2P."""
    for src, dst in SHORTEN_MAP:
        ipa = ipa.replace(src, dst)
    return ipa


class _EspeakVoice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


class _Espeak:
    """The loaded library (one per process)."""

    _instance: "_Espeak | None" = None
    lock = threading.Lock()

    def __init__(self):
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.cdll.LoadLibrary(path)
        except OSError as e:
            raise RuntimeError("libespeak-ng not found: install espeak-ng (e.g. apt-get install espeak-ng)") from e
        if self.lib.espeak_Initialize(2, 0, None, 0) <= 0:  # AUDIO_OUTPUT_SYNCHRONOUS, no audio produced
            raise RuntimeError("espeak_Initialize failed")
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        self.voice: str | None = None

    @classmethod
    def get(cls) -> "_Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def set_voice(self, voice: str) -> None:
        if voice == self.voice:
            return
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:  # names like "de", "fr-fr"; else by language
            props = _EspeakVoice(languages=voice.encode())
            if self.lib.espeak_SetVoiceByProperties(ctypes.byref(props)) != 0:
                raise ValueError(f"espeak-ng has no voice for {voice!r} (see `espeak-ng --voices`)")
        self.voice = voice

    def ipa(self, text: str) -> str:
        """All clauses of ``text`` in IPA (stress marks kept), joined by spaces."""
        ptr = ctypes.pointer(ctypes.c_char_p(text.encode("utf-8")))
        clauses = []
        while ptr.contents.value is not None:
            out = self.lib.espeak_TextToPhonemes(ptr, 1, 0x02)  # espeakCHARS_UTF8, IPA
            if out:
                clauses.append(out.decode("utf-8"))
        return " ".join(clauses)


class Phonemizer:
    """IPA G2P for one or more languages with an LRU cache. ``phonemize_batch`` de-duplicates its input."""

    def __init__(self, shorten: bool = True, with_stress: bool = False, cache_size: int = 200_000):
        self.shorten, self.with_stress, self.cache_size = shorten, with_stress, cache_size
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()

    @staticmethod
    def voice_for(language: str) -> str:
        """A whisper code ("en") maps to its espeak-ng voice ("en-us"); a regional voice of a supported language
        ("en-gb") is kept; Mandarin ("zh", "zh-CN") maps to MANDARIN (pypinyin). Anything else raises."""
        base = base_language(language)
        if base == MANDARIN:
            return MANDARIN
        if base not in ESPEAK_VOICES:
            raise unsupported(language)
        return ESPEAK_VOICES[base] if language.lower() == base else language

    def _phonemize_span(self, espeak: _Espeak, span: str) -> str:
        out = _FLAGS_RE.sub("", espeak.ipa(span))  # language_switch="remove-flags"
        if not self.with_stress:
            out = _STRESS_RE.sub("", out)
        return " ".join(out.split())

    def _phonemize(self, text: str, voice: str) -> str:
        text = text.replace("^", "'")  # as the official G2P
        espeak = _Espeak.get()
        pieces = []
        with espeak.lock:
            espeak.set_voice(voice)
            for piece in _PUNCT_RE.split(text):
                if _PUNCT_RE.fullmatch(piece):
                    pieces.append(piece.strip() + (" " if piece.endswith((" ", "\t", "\n")) else ""))
                elif piece.strip():
                    pieces.append(self._phonemize_span(espeak, piece))
        out = "".join(pieces).strip()
        return shorten_ipa(out) if self.shorten else out

    @staticmethod
    def _pinyin(text: str) -> str:
        from flexitrain.text.mandarin import to_pinyin

        return to_pinyin(text)  # already ASCII; the IPA shortening does not apply

    def phonemize(self, text: str, language: str = "en") -> str:
        key = (self.voice_for(language), text)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        out = self._pinyin(text) if key[0] == MANDARIN else self._phonemize(text, key[0])
        self._cache[key] = out
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def phonemize_batch(self, texts: list[str], languages: str | list[str] = "en") -> list[str]:
        langs = [languages] * len(texts) if isinstance(languages, str) else list(languages)
        if len(langs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(langs)} languages")
        unique = {(t, l): None for t, l in zip(texts, langs)}
        done = {key: self.phonemize(*key) for key in unique}
        return [done[(t, l)] for t, l in zip(texts, langs)]
