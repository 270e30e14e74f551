"""Mandarin G2P: Chinese text -> tone-numbered pinyin through pypinyin (a dictionary + phrase-based converter
made for Mandarin, so polyphones are read by context: 银行 -> "yin2 hang2", 行走 -> "xing2 zou3").

Output format: one syllable per word, tone digit 1-4 and 5 for the neutral tone, "v" for ü (绿 -> "lv4"),
syllables separated by spaces, Chinese punctuation turned into the ASCII marks the English G2P keeps
("你好，世界。" -> "ni3 hao3, shi4 jie4."). Arabic numerals are first read out in Chinese (2024年 -> 二零二四年,
3.5% -> 百分之三点五, 10086 -> 一万零八十六), because pypinyin leaves digits as they are. Runs of other
scripts (English words) are kept as written.

Why not espeak-ng's cmn voice: the libespeak-ng build here turns hanzi into pinyin and then reads that pinyin
with English rules (你好 -> "nɪ5θɹiː5 ..."), which is silent nonsense for the model.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_DIGITS = "零一二三四五六七八九"
_SECTION_UNITS = ("", "万", "亿")  # every 4 digits; numbers up to 12 digits are read as amounts
_MAX_AMOUNT_DIGITS = 12

# Chinese marks NFKC leaves alone -> the ASCII marks of the espeak path (full-width ，！？；： are NFKC'd)
_PUNCTUATION = {"。": ".", "、": ",", "“": '"', "”": '"', "‘": "'", "’": "'", "「": '"', "」": '"', "『": '"',
                "』": '"', "《": '"', "》": '"', "【": "[", "】": "]", "…": "...", "—": "-", "～": "~", "·": " "}
_PUNCT_RE = re.compile("|".join(map(re.escape, _PUNCTUATION)))
_SPACE_BEFORE_MARK_RE = re.compile(r"\s+([,.!?;:\]\)])")
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)%")
_YEAR_RE = re.compile(r"(\d{4})(?=年)")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


def _section(n: int) -> str:
    """1..9999 in Chinese numerals, with 零 for inner gaps (1001 -> 一千零一, 1010 -> 一千零一十)."""
    out, gap = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d == 0:
            gap = gap or bool(out)
            continue
        out += ("零" if gap else "") + _DIGITS[d] + unit
        gap = False
    return out


def read_digits(digits: str) -> str:
    """Digit by digit: 2024 -> 二零二四 (years, codes, phone numbers)."""
    return "".join(_DIGITS[int(d)] for d in digits)


def read_integer(digits: str) -> str:
    """An amount: 10 -> 十, 15 -> 十五, 10086 -> 一万零八十六, 100000 -> 十万. A leading zero (0371) or more than
    12 digits is read digit by digit, as such strings are codes rather than amounts."""
    if len(digits) > 1 and digits[0] == "0" or len(digits) > _MAX_AMOUNT_DIGITS:
        return read_digits(digits)
    n = int(digits)
    if n == 0:
        return _DIGITS[0]
    sections = []
    while n:
        sections.append(n % 10000)
        n //= 10000
    out, gap = "", False
    for i in reversed(range(len(sections))):
        s = sections[i]
        if s == 0:
            gap = gap or bool(out)
            continue
        if out and (gap or s < 1000):  # 一万零八十六: a short lower section is preceded by 零
            out += _DIGITS[0]
        out += _section(s) + _SECTION_UNITS[i]
        gap = False
    return out[1:] if out.startswith("一十") else out  # 十五, 十万 (not 一十五)


def read_number(text: str) -> str:
    """An integer or decimal: 3.14 -> 三点一四."""
    whole, _, frac = text.partition(".")
    return read_integer(whole) + ("点" + read_digits(frac) if frac else "")


def normalize_numbers(text: str) -> str:
    """Arabic numerals -> Chinese readings: percentages, years before 年 digit by digit, then other numbers."""
    text = _PERCENT_RE.sub(lambda m: "百分之" + read_number(m.group(1)), text)
    text = _YEAR_RE.sub(lambda m: read_digits(m.group(1)), text)
    return _NUMBER_RE.sub(lambda m: read_number(m.group(0)), text)


def normalize_punctuation(text: str) -> str:
    """NFKC (full-width letters, digits and ，！？；：) then the remaining Chinese marks to ASCII."""
    return _PUNCT_RE.sub(lambda m: _PUNCTUATION[m.group(0)], unicodedata.normalize("NFKC", text))


@lru_cache(maxsize=None)
def _pypinyin():
    try:
        import pypinyin
    except ImportError as e:
        raise ImportError("Mandarin G2P needs pypinyin: pip install 'pypinyin>=0.55' (the [tts] extra)") from e
    return pypinyin


def to_pinyin(text: str) -> str:
    """Chinese text -> tone-numbered pinyin (see the module docstring)."""
    pypinyin = _pypinyin()
    text = normalize_numbers(normalize_punctuation(text))
    pieces = pypinyin.lazy_pinyin(text, style=pypinyin.Style.TONE3, neutral_tone_with_five=True)
    joined = " ".join(p.strip() for p in pieces if p.strip())
    return " ".join(_SPACE_BEFORE_MARK_RE.sub(r"\1", joined).split())
