"""FlexiCodec-TTS models (plain PyTorch): the Voicebox NAR (`voicebox`) and its ODE sampler (`flow_sampling`)."""
