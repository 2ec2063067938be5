"""umT5 text encoder, prompt tokenizer and CLIP image tower: checkpoint layout, end-to-end encoding
through files written here (tiny configs), prompt cache and position-embedding interpolation."""

import json

import pytest
import torch

from conftest import randomize
from golden_kinds import REFERENCE_DIR
from wan.utils.tiny_tokenizer import make_tiny_tokenizer
from wan.checkpoint import CheckpointError
from wan.modules.clip import CLIPImageEncoder, VisionTransformer, interpolate_pos_embedding
from wan.modules.t5 import T5Encoder, T5RelativeEmbedding, clamp_fp16
from wan.modules.text_encoder import T5TextEncoder
from wan.modules.tokenizers import HuggingfaceTokenizer, clean_prompt

TINY_T5 = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, num_buckets=8, dropout=0.0)
TINY_CLIP = dict(image_size=28, patch_size=14, dim=32, mlp_ratio=4, out_dim=16, num_heads=2, num_layers=3)
TEXT_LEN = 16


def manifest(name):
    with open(REFERENCE_DIR / "manifests" / f"{name}.json") as f:
        return json.load(f)


def meta_shapes(model, prefix=""):
    return {prefix + k: list(v.shape) for k, v in model.state_dict().items()}


def test_umt5_xxl_matches_checkpoint_manifest():
    expected = manifest("umt5_xxl_encoder")
    with torch.device("meta"):
        model = T5Encoder()
    assert meta_shapes(model) == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


def test_clip_vit_h_matches_visual_part_of_manifest():
    expected = {k: v for k, v in manifest("clip_xlm_roberta_vit_h_14")["keys"].items() if k.startswith("visual.")}
    with torch.device("meta"):
        model = VisionTransformer()
    assert meta_shapes(model, "visual.") == expected


def test_relative_position_buckets_match_transformers_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)
    for num_buckets in (8, 32):
        ours = T5RelativeEmbedding(num_buckets, num_heads=1).buckets(rel)
        theirs = T5Attention._relative_position_bucket(rel, True, num_buckets, 128)
        assert torch.equal(ours, theirs)


def test_clean_prompt_as_official():
    assert clean_prompt("  a  cat\n\ton &amp;amp; the\u00a0mat ") == "a cat on & the mat"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=TINY_T5["vocab"])


def test_tokenizer_pads_masks_and_appends_eos(tokenizer_dir):
    tokenizer = HuggingfaceTokenizer(tokenizer_dir, text_len=8)
    ids, mask = tokenizer(["a  red cat", "a cat on the tree in the city at night"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.int64
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[0, 3].item() == 1 and ids[0, 4:].eq(0).all()  # </s> then <pad>
    assert mask[1].all() and ids[1, -1].item() == 1  # truncated, end token kept


def test_tokenizer_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="umt5-xxl"):
        HuggingfaceTokenizer(tmp_path / "google" / "umt5-xxl")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HuggingfaceTokenizer(tmp_path)


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    model = randomize(T5Encoder(**TINY_T5), std=0.3)
    path = tmp_path_factory.mktemp("t5") / "models_t5_tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


@pytest.fixture
def text_encoder(t5_checkpoint, tokenizer_dir):
    path, _ = t5_checkpoint
    return T5TextEncoder.from_checkpoint(path, tokenizer_dir, text_len=TEXT_LEN, dtype=torch.float32, **TINY_T5)


def test_prompt_to_embeddings_trimmed_and_padding_invisible(text_encoder, t5_checkpoint, tokenizer_dir):
    prompts = ["a red cat sitting on the tree", "dog"]
    out = text_encoder.encode(prompts)
    assert [tuple(e.shape) for e in out] == [(8, 32), (2, 32)]  # words + </s>
    # Padding is masked as keys, so each trimmed output equals the prompt encoded alone, unpadded.
    _, reference = t5_checkpoint
    ids, mask = HuggingfaceTokenizer(tokenizer_dir, text_len=TEXT_LEN)(prompts)
    for i, embedding in enumerate(out):
        n = int(mask[i].sum())
        with torch.no_grad():
            alone = reference(ids[i:i + 1, :n])[0]
        torch.testing.assert_close(embedding, alone, atol=1e-5, rtol=1e-5)


def test_prompt_cache_encodes_each_prompt_once(text_encoder):
    calls = []
    text_encoder.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    negative = "blurry, static"
    first = text_encoder.encode(["a dog running", negative])
    second = text_encoder(["a bird flying", negative, negative])
    assert calls == [2, 1]  # the negative prompt is not encoded again, nor twice in one batch
    assert text_encoder.cache_hits == 1 and text_encoder.cache_misses == 3
    assert torch.equal(first[1], second[1]) and torch.equal(second[1], second[2])


def test_prompt_cache_is_bounded_lru(text_encoder):
    text_encoder.cache_size = 2
    text_encoder.encode(["a"])
    text_encoder.encode(["cat"])
    text_encoder.encode(["a"])  # refreshes "a": "cat" is now the oldest
    text_encoder.encode(["dog"])
    assert list(text_encoder._cache) == ["a", "dog"]
    text_encoder.cache_size = 0
    text_encoder.clear_cache()
    text_encoder.encode(["fish"])
    assert not text_encoder._cache


def test_output_device(text_encoder):
    assert text_encoder.encode(["cat"])[0].device.type == "cpu"
    assert text_encoder.encode(["cat"], device="meta")[0].device.type == "meta"
    text_encoder.output_device = torch.device("meta")
    assert text_encoder.encode(["cat"])[0].device.type == "meta"


def test_t5_low_precision_and_shared_position_bias(t5_checkpoint):
    _, model = t5_checkpoint
    ids, mask = torch.randint(0, 64, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    bf16_model = T5Encoder(**TINY_T5).eval()
    bf16_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model(ids, mask)
        half = bf16_model.to(torch.bfloat16)(ids, mask)
        shared = randomize(T5Encoder(**TINY_T5, shared_pos=True)).eval()
        assert "pos_embedding.embedding.weight" in shared.state_dict()
        assert not any(k.startswith("blocks.0.pos_embedding") for k in shared.state_dict())
        assert torch.isfinite(shared(ids, mask)).all()
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)
    overflow = torch.tensor([torch.inf, -torch.inf, 1.0], dtype=torch.float16)
    assert torch.isfinite(clamp_fp16(overflow)).all()


def tiny_clip():
    return randomize(VisionTransformer(**TINY_CLIP), std=0.2).eval()


def test_clip_list_and_batch_forms_agree():
    encoder = CLIPImageEncoder(tiny_clip())
    images = torch.rand(2, 3, 40, 52) * 2 - 1
    batch = encoder.encode(images)
    clips = encoder([images[0][:, None], images[1][:, None]])  # the official [C, 1, H, W] list form
    assert batch.shape == (2, 5, 32)
    torch.testing.assert_close(batch, clips)


def test_clip_position_interpolation_for_other_sizes():
    model = tiny_clip()
    images = torch.rand(1, 3, 28, 28) * 2 - 1
    # At the native size interpolation is the identity, and a same-size bicubic resize is too.
    torch.testing.assert_close(CLIPImageEncoder(model, resize=False).encode(images), CLIPImageEncoder(model).encode(images))
    large = CLIPImageEncoder(model, resize=False).encode(torch.rand(2, 3, 56, 70) * 2 - 1)
    assert large.shape == (2, 1 + 4 * 5, 32)
    pos = interpolate_pos_embedding(model.pos_embedding, (4, 5))
    assert torch.equal(pos[:, 0], model.pos_embedding[:, 0])  # the class token keeps its embedding
    with pytest.raises(ValueError, match="interpolate_pos"):
        model(torch.rand(1, 3, 56, 56))


def test_vit_h_position_grid_for_512_references():
    with torch.device("meta"):
        pos = interpolate_pos_embedding(VisionTransformer().pos_embedding, (36, 36))
    assert pos.shape == (1, 1 + 36 * 36, 1280)


def full_clip_checkpoint(model, path, rename=None):
    state = {f"visual.{k}": v for k, v in model.state_dict().items()}
    state.update({"textual.token_embedding.weight": torch.zeros(10, 8), "log_scale": torch.tensor(2.6)})
    if rename:
        old, new = rename
        state[new] = state.pop(old)
    torch.save(state, path)
    return path


def test_clip_checkpoint_with_text_tower_loads(tmp_path):
    model = tiny_clip()
    path = full_clip_checkpoint(model, tmp_path / "clip.pth")
    loaded = CLIPImageEncoder.from_checkpoint(path, **TINY_CLIP)
    assert loaded.model.patch_embedding.weight.dtype == torch.float32
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), CLIPImageEncoder(model).encode(images))


def test_clip_checkpoint_with_renamed_visual_key_fails_naming_it(tmp_path):
    rename = ("visual.transformer.1.attn.to_qkv.weight", "visual.transformer.1.attn.qkv.weight")
    path = full_clip_checkpoint(tiny_clip(), tmp_path / "clip.pth", rename)
    with pytest.raises(CheckpointError, match=r"transformer\.1\.attn\.qkv\.weight") as error:
        CLIPImageEncoder.from_checkpoint(path, **TINY_CLIP)
    assert "transformer.1.attn.to_qkv.weight" in str(error.value)
