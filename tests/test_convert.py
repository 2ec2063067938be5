"""Key-layout conversions against the libraries that define the other layouts (test-only oracles)."""

import pytest
import torch

from conftest import randomize
from wan.convert.encoders_hf import clip_to_hf, t5_to_hf
from wan.convert.keymap import KeyTable
from wan.modules.clip import VisionTransformer, load_clip_visual
from wan.modules.t5 import T5Encoder, load_t5_encoder


def test_key_table_round_trip_and_unmatched_keys_are_listed():
    table = KeyTable([("blocks.{}.attn.{}", "layers.{}.attention.{}")], name="demo")
    state = {"blocks.3.attn.weight": torch.ones(1)}
    assert table.to_source(table.to_target(state)).keys() == state.keys()
    with pytest.raises(KeyError, match="1 key\\(s\\) match no row: blocks.0.mlp.weight"):
        table.to_target({"blocks.0.mlp.weight": torch.ones(1)})


def test_umt5_from_transformers_layout_matches_transformers(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    config = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=8,
                  shared_pos=False, dropout=0.0)
    ours = randomize(T5Encoder(**config)).eval()
    theirs = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                         relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()
    theirs.load_state_dict({**t5_to_hf(ours.state_dict()), "encoder.embed_tokens.weight": ours.token_embedding.weight})
    theirs.save_pretrained(tmp_path)
    loaded = load_t5_encoder(tmp_path / "model.safetensors", dtype=torch.float32, **config)
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(loaded(ids, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_from_transformers_layout_matches_transformers(tmp_path, with_projection):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = dict(image_size=28, patch_size=14, dim=32, mlp_ratio=4, num_heads=2, num_layers=3)
    ours = randomize(VisionTransformer(out_dim=16, **config)).eval()
    hf_config = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
                                 projection_dim=16)
    theirs = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(hf_config).eval()
    state = clip_to_hf(ours.state_dict())
    if not with_projection:
        state.pop("visual_projection.weight")
    # transformers >= 5 drops the `vision_model.` level of CLIPVisionModel; real files carry it.
    own_keys = theirs.state_dict().keys()
    theirs.load_state_dict({k if k in own_keys else k.removeprefix("vision_model."): v for k, v in state.items()})
    theirs.save_pretrained(tmp_path)
    loaded = load_clip_visual(tmp_path / "model.safetensors", out_dim=16 if with_projection else None, **config)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = theirs(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(loaded(images), expected, atol=1e-5, rtol=1e-5)
