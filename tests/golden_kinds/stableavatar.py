"""Golden runners of the StableAvatar family (Francis-Rings/StableAvatar): wav2vec2 window features."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.audio.wav2vec import Wav2Vec2Features

golden_dir(EXT_DIR / "stableavatar" / "golden", "wav2vec_features")


def build_wav2vec(config, params, do_normalize=True):
    """A transformers `Wav2Vec2Model` of the case's config with its parameters."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**config))
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and set(missing) <= {"masked_spec_embed"}, (missing, unexpected)
    return Wav2Vec2Features(model, do_normalize)


@runner("wav2vec_features")
def run_wav2vec_features(case):
    config = case.config
    encoder = build_wav2vec(config["wav2vec"], case.params, config["feature_extractor"]["do_normalize"])
    waveform = case.inputs["waveform"]
    for k, window in enumerate(case.meta["windows"]):
        start, end = window["audio_samples"]
        audio = waveform[torch.arange(start, end) % len(waveform)]
        assert_close(encoder.input_values(audio), case.outputs[f"input_values_w{k}"], name=f"input_values_w{k}")
        assert_close(encoder.last_hidden_state(audio), case.outputs[f"last_hidden_state_w{k}"],
                     name=f"last_hidden_state_w{k}")
