"""Text front end: espeak-ng IPA G2P + Whisper multilingual BPE, checked against the official outputs
recorded in ../shared/reference/ar_tts_tiny/reference_cases.json."""

import importlib.util
import json

import pytest

from conftest import requires_espeak

requires_whisper = pytest.mark.skipif(importlib.util.find_spec("whisper") is None or
                                      importlib.util.find_spec("tiktoken") is None,
                                      reason="openai-whisper / tiktoken not installed")


@pytest.fixture(scope="module")
def cases(shared_reference):
    path = shared_reference / "ar_tts_tiny" / "reference_cases.json"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return json.loads(path.read_text())["text_frontend"]


@requires_whisper
def test_whisper_bpe_matches_official(cases):
    from flexitrain.text import WhisperTextTokenizer

    tok = WhisperTextTokenizer()
    assert tok.vocab_size == 51865 and tok.vocab_size < 51866  # every id fits the model's 51866-row table
    assert tok.language_token("en") == tok.language_token("en-us") == tok.language_token("EN_gb") == 50259
    assert tok.language_token("de") == 50261
    case = cases["text2idx(g2p_prob=0)"]
    assert tok.encode(case["text"], "en") == case["ids"]
    with pytest.raises(ValueError, match="unknown language"):
        tok.language_token("xx")


@requires_whisper
@pytest.mark.parametrize("ipa", ["ðə kwˈɪk bɹˈaʊn fˈɑːks", "həloυ wə~ld, ðιs ιz a tεst.",
                                 "ʃˈiː sˈɛlz ʃˈɛlz", "bɔ̃ʒˈuʁ lə wiːkˈɛnd", "ɕiɛ˥˩ ɕiɛ"])
def test_bpe_round_trip_on_ipa(ipa):
    from flexitrain.text import WhisperTextTokenizer

    tok = WhisperTextTokenizer()
    ids = tok.encode(ipa, "en")
    assert ids[0] == 50259 and tok.decode(ids) == ipa


@requires_espeak
@requires_whisper
def test_g2p_matches_official(cases):
    from flexitrain.text import TextFrontend

    case = cases["g2p_phonemizer_en"]
    front = TextFrontend(g2p=True)
    assert front.phonemizer.phonemize(case["text"], "en") == case["phonemes"]
    assert front(case["text"], "en") == case["ids"]
    raw = TextFrontend(g2p=False)
    assert raw(case["text"]) == cases["text2idx(g2p_prob=0)"]["ids"]


@requires_espeak
def test_phonemizer_languages_batch_and_cache():
    from flexitrain.text import Phonemizer

    ph = Phonemizer(shorten=False)
    de, fr, en = ph.phonemize_batch(["Hallo Welt.", "Bonjour le monde.", "Hello world."], ["de", "fr", "en"])
    assert de == "haloː vɛlt." and en == "həloʊ wɜːld."
    assert fr.startswith("bɔ̃ʒuʁ") and fr.endswith(".")
    assert "ˈ" not in de + fr + en and "(" not in fr  # no stress marks, no language-switch flags
    again = ph.phonemize_batch(["Hello world."] * 3, "en")
    assert again == [en] * 3 and len(ph._cache) == 3
    with pytest.raises(ValueError, match="no reliable G2P for language 'xx-nonexistent'"):
        ph.phonemize("hello", "xx-nonexistent")


@pytest.mark.parametrize("language, why", [("ja", "kanji read as 'Chinese letter'"),
                                           ("ar", "vowels lost without diacritics"), ("th", "no voice mapped"),
                                           ("yue", "not a whisper-99 language")])
def test_languages_without_a_reliable_g2p_are_refused(language, why):
    from flexitrain.text import SUPPORTED_LANGUAGES, Phonemizer

    with pytest.raises(ValueError) as e:
        Phonemizer().phonemize("text", language)
    message = str(e.value)
    assert f"no reliable G2P for language {language!r}" in message, why
    assert all(code in message for code in SUPPORTED_LANGUAGES) and "g2p=False" in message


def test_voice_mapping_keeps_regional_voices_and_routes_mandarin():
    from flexitrain.text import Phonemizer

    assert Phonemizer.voice_for("en") == "en-us" and Phonemizer.voice_for("EN") == "en-us"
    assert Phonemizer.voice_for("en-gb") == "en-gb" and Phonemizer.voice_for("fr") == "fr-fr"
    assert Phonemizer.voice_for("zh") == Phonemizer.voice_for("zh-CN") == Phonemizer.voice_for("zh_tw") == "zh"
