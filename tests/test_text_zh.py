"""Chinese text front end: pypinyin tone-numbered pinyin (polyphones by context, neutral tone 5, ü as v, numbers
read out, Chinese punctuation to ASCII) and the TextFrontend policy for "zh" (official: hanzi to the BPE).
Every expected string below was checked by hand against a dictionary reading."""
import importlib.util

import pytest

from conftest import requires_espeak

pytest.importorskip("pypinyin")
requires_whisper = pytest.mark.skipif(importlib.util.find_spec("whisper") is None or
                                      importlib.util.find_spec("tiktoken") is None,
                                      reason="openai-whisper / tiktoken not installed")


@pytest.mark.parametrize("text, pinyin", [
    ("你好世界", "ni3 hao3 shi4 jie4"),
    ("我去银行取钱。", "wo3 qu4 yin2 hang2 qu3 qian2."),            # 行 = hang2 in 银行
    ("他在路上行走！", "ta1 zai4 lu4 shang4 xing2 zou3!"),          # 行 = xing2 in 行走
    ("银行行长", "yin2 hang2 hang2 zhang3"),                        # 行长: hang2 zhang3 (长 = zhang3, not chang2)
    ("他长大了", "ta1 zhang3 da4 le5"),
    ("我们吃了吗？", "wo3 men5 chi1 le5 ma5?"),                     # neutral tones are 5
    ("绿色的女儿", "lv4 se4 de5 nv3 er2"),                          # ü written v
    ("今天是2024年5月1日，气温25.5度。",
     "jin1 tian1 shi4 er4 ling2 er4 si4 nian2 wu3 yue4 yi1 ri4, qi4 wen1 er4 shi2 wu3 dian3 wu3 du4."),
    ("打折50%", "da3 zhe2 bai3 fen1 zhi1 wu3 shi2"),
    ("第２章", "di4 er4 zhang1"),                                   # full-width digit
    ("我爱 Python，你呢？", "wo3 ai4 Python, ni3 ne5?"),             # other scripts kept as written
])
def test_pinyin_of_sentences(text, pinyin):
    from flexitrain.text.mandarin import to_pinyin

    assert to_pinyin(text) == pinyin


@pytest.mark.parametrize("digits, reading", [
    ("0", "零"), ("5", "五"), ("10", "十"), ("15", "十五"), ("20", "二十"), ("101", "一百零一"), ("110", "一百一十"),
    ("1001", "一千零一"), ("1010", "一千零一十"), ("10000", "一万"), ("10086", "一万零八十六"), ("100000", "十万"),
    ("100010000", "一亿零一万"), ("123456789012", "一千二百三十四亿五千六百七十八万九千零一十二"),
    ("0371", "零三七一"),                    # leading zero: a code, read digit by digit
    ("1234567890123", "一二三四五六七八九零一二三"),  # beyond 12 digits: digit by digit
])
def test_integer_readings(digits, reading):
    from flexitrain.text.mandarin import read_integer

    assert read_integer(digits) == reading


def test_number_normalisation_in_context():
    from flexitrain.text.mandarin import normalize_numbers

    assert normalize_numbers("1998年出生，身高1.75米，考了100分，占3.5%。") == \
        "一九九八年出生，身高一点七五米，考了一百分，占百分之三点五。"


def test_mandarin_phonemizer_does_not_use_espeak(monkeypatch):
    """espeak-ng's cmn voice reads pinyin as English here: the zh path must never reach it."""
    from flexitrain.text import Phonemizer
    from flexitrain.text import phonemize

    def no_espeak():
        raise AssertionError("espeak-ng was called for Mandarin")

    monkeypatch.setattr(phonemize._Espeak, "get", staticmethod(no_espeak))
    ph = Phonemizer()
    assert ph.phonemize("你好，世界。", "zh") == "ni3 hao3, shi4 jie4."
    assert ph.phonemize_batch(["银行", "行走"], "zh-CN") == ["yin2 hang2", "xing2 zou3"]


@requires_whisper
def test_frontend_feeds_hanzi_by_default_as_the_official_training_pipeline():
    """The official data pipeline applies G2P to en/fr samples only: Chinese reaches the BPE as characters."""
    from flexitrain.text import TextFrontend

    front = TextFrontend()
    ids = front("你好世界", "zh")
    assert ids == front.tokenizer.encode("你好世界", "zh") == TextFrontend(g2p=False)("你好世界", "zh")
    assert ids[0] == 50260 and front.tokenizer.decode(ids) == "你好世界"  # <|zh|>


@requires_whisper
def test_frontend_pinyin_mode():
    from flexitrain.text import TextFrontend

    front = TextFrontend(zh_g2p="pinyin")
    ids = front("我去银行取钱。", "zh")
    assert ids[0] == 50260 and front.tokenizer.decode(ids) == "wo3 qu4 yin2 hang2 qu3 qian2."
    assert front.text_for_model(["行走"], "zh_CN") == ["xing2 zou3"]
    with pytest.raises(ValueError, match="zh_g2p must be one of"):
        TextFrontend(zh_g2p="ipa")


@requires_espeak
@requires_whisper
def test_frontend_mixed_languages_and_refusals():
    from flexitrain.text import TextFrontend

    front = TextFrontend(zh_g2p="pinyin")
    en, zh = front.text_for_model(["Hello world.", "你好"], ["en", "zh"])
    assert en == "həloυ wə~ld." and zh == "ni3 hao3"
    with pytest.raises(ValueError, match="no reliable G2P for language 'ja'.*zh"):
        front("こんにちは", "ja")
    assert TextFrontend(g2p=False)("こんにちは", "ja")[0] == front.tokenizer.language_token("ja")  # raw text is fine
