"""Text front end of the AR TTS: espeak-ng IPA G2P and the Whisper multilingual BPE (offline)."""
from flexitrain.text.phonemize import Phonemizer, shorten_ipa
from flexitrain.text.tokenizer import TextFrontend, WhisperTextTokenizer

__all__ = ["Phonemizer", "shorten_ipa", "TextFrontend", "WhisperTextTokenizer"]
