"""Tiny random wav2vec2 folders in the Hugging Face hub layout, for tests and tiny checkpoints.

"base" follows facebook/wav2vec2-base-960h (StableAvatar: group-norm feature extractor, post-LN
layers, no conv bias); "large" follows wav2vec2-large-xlsr-53-english (Wan2.2 S2V: layer-norm
feature extractor, pre-LN "stable layer norm" layers, conv bias). Real kernels and strides (320
samples per token), tiny widths. Saved as the hub's `Wav2Vec2ForCTC` (`wav2vec2.` prefix, `lm_head`)
with a `preprocessor_config.json`, like the released folders.
"""

from pathlib import Path

import torch

TINY_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                     num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32,
                     hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0)
LAYOUTS = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


def make_tiny_wav2vec2(folder, layout="base", seed=0, **overrides):
    """Writes a random tiny wav2vec2 folder; `overrides` change config fields (e.g. num_hidden_layers).
    Returns the folder."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    if layout not in LAYOUTS:
        raise ValueError(f"unknown wav2vec2 layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    config = Wav2Vec2Config(**{**TINY_WAV2VEC2, **LAYOUTS[layout], **overrides})
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # the default init leaves norms at identity; random values test their wiring
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=layout == "large").save_pretrained(folder)
    return folder
