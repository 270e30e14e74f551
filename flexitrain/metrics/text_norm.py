"""A fixed English text normaliser applied to both reference and hypothesis before WER/CER.

It is deliberately small and frozen, so scores stay comparable across runs and versions.
The rules, applied in this order:

1. Unicode NFKC; typographic quotes/apostrophes/dashes become ASCII ``'`` and ``-``.
2. Lowercase.
3. ``&`` becomes `` and ``, ``%`` becomes `` percent``, ``+`` becomes `` plus``.
4. Thousands separators inside digit groups are dropped (``1,000`` -> ``1000``).
5. Numbers become words: ``42`` -> ``forty two``, ``3.5`` -> ``three point five``,
   ordinals ``1st 2nd 3rd 21st 4th`` -> ``first second third twenty first fourth``.
   Integers up to 10^15 - 1 are spelled out; longer digit runs are spelled digit by digit.
   No "and" is inserted (``105`` -> ``one hundred five``), years are read as cardinals.
6. Apostrophes are deleted (``don't`` -> ``dont``, ``dog's`` -> ``dogs``), so contractions
   compare equal regardless of the apostrophe character used.
7. Every other character that is not a (Unicode) letter or digit (punctuation, hyphens, symbols)
   becomes a space (``well-known`` -> ``well known``).
8. Whitespace runs collapse to one space; leading/trailing space is stripped.

Not done (on purpose): spelling variants (colour/color), contraction expansion, filler-word
removal, abbreviations (``dr.`` stays ``dr``).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "number_to_words"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_MAX_SPELLED = 10**15

_CHAR_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u02bc": "'", "`": "'",
                           "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-",
                           "\u2014": "-", "\u2212": "-"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_DECIMAL = re.compile(r"\b(\d+)\.(\d+)\b")
_INTEGER = re.compile(r"\d+")
_NON_WORD = re.compile(r"[^\w\s]|_")


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int) -> str:
    """Spell a non-negative integer in words (``1205`` -> ``one thousand two hundred five``)."""
    if n < 0:
        raise ValueError(f"number_to_words expects a non-negative integer, got {n}")
    if n >= _MAX_SPELLED:
        return " ".join(_ONES[int(d)] for d in str(n))
    words: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            words += _below_thousand(n // value) + [name]
            n %= value
    if n or not words:
        words += _below_thousand(n)
    return " ".join(words)


def _ordinal(n: int) -> str:
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _digits(s: str) -> str:
    # Leading zeros ("007") and very long runs are read digit by digit.
    if len(s) > 1 and s.startswith("0"):
        return " ".join(_ONES[int(d)] for d in s)
    return number_to_words(int(s))


def normalize_text(text: str) -> str:
    """Normalise English text for WER/CER; see the module docstring for the exact rules."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects a str, got {type(text).__name__}")
    s = unicodedata.normalize("NFKC", text).translate(_CHAR_MAP).lower()
    s = s.replace("&", " and ").replace("%", " percent ").replace("+", " plus ")
    s = _THOUSANDS.sub("", s)
    s = _ORDINAL.sub(lambda m: f" {_ordinal(int(m.group(1)))} ", s)
    s = _DECIMAL.sub(lambda m: f" {_digits(m.group(1))} point "
                     + " ".join(_ONES[int(d)] for d in m.group(2)) + " ", s)
    s = _INTEGER.sub(lambda m: f" {_digits(m.group(0))} ", s)
    s = s.replace("'", "")
    s = _NON_WORD.sub(" ", s)
    return " ".join(s.split())
