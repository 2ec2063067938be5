"""Multi-reference composition (SkyReels-A2 checkpoints, A3 object / mask / background): checkpoint
layouts, reference preprocessing and condition, the pipeline end to end, edge masks.
(Golden parity with the reference code: tests/golden_kinds/a2.py through tests/test_golden.py.)"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, randomize, tiny_dit_config
from golden_kinds import EXT_DIR
from pipelines.multiref import A2_DEFAULTS
from pipelines.references import A3_SLOTS, clip_pixels, latent_mask, reference_condition, vae_pixels
from wan.convert.dit_diffusers import config_from_diffusers, config_to_diffusers, dit_to_diffusers
from wan.convert.encoders_hf import clip_to_hf
from wan.configs import get_preset
from wan.modules.clip import VisionTransformer
from wan.modules.model import WanModel
from wan.modules.multiref import MultiReferenceDiT, ReferenceTokens

A2_MANIFESTS = EXT_DIR / "a2" / "manifests"


def manifest(name):
    return json.loads((A2_MANIFESTS / f"{name}.json").read_text())


def shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


def test_a2_transformer_state_dict_matches_manifest():
    """The released A2 transformer (its config is Wan2.1-I2V-14B's) in diffusers key names."""
    config = config_from_diffusers(config_to_diffusers(get_preset("i2v-14B").dit))
    with torch.device("meta"):
        model = WanModel.from_config(config)
    expected = manifest("a2_14B")
    assert shapes(dit_to_diffusers(model.state_dict())) == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


def test_a2_image_encoder_hf_state_dict_matches_manifest():
    """A2's image encoder is a transformers CLIPVisionModel (ViT-H/14, no projection)."""
    with torch.device("meta"):
        model = VisionTransformer(out_dim=None)
    expected = manifest("a2_image_encoder_hf")
    assert shapes(clip_to_hf(model.state_dict())) == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


def test_a3_mask_is_padded_black_and_other_slots_white():
    tall = np.full((40, 10, 3), 128, dtype=np.uint8)  # padded left and right to the square / video aspect
    obj, mask, background = A3_SLOTS
    corner = lambda pixels: pixels[:, 0, 0]  # noqa: E731
    white = clip_pixels(np.full((1, 1, 3), 255, np.uint8), 28)[:, 0, 0]
    black = clip_pixels(np.zeros((1, 1, 3), np.uint8), 28)[:, 0, 0]
    assert torch.allclose(corner(clip_pixels(tall, 28, obj.fill)), white)
    assert torch.allclose(corner(clip_pixels(tall, 28, mask.fill)), black)
    assert torch.equal(corner(vae_pixels(tall, 32, 48, mask)), torch.full((3,), -1.0))
    assert torch.equal(corner(vae_pixels(tall, 32, 48, obj)), torch.full((3,), 1.0))
    # the background is centre-cropped, not padded: no border of either colour
    assert torch.allclose(vae_pixels(tall, 32, 48, background), torch.tensor(128 / 255 * 2 - 1), atol=1e-6)


def stub_encode(video):
    """A deterministic stand-in VAE: frame groups 1 + 4k averaged, 8x8 average-pooled (3 -> 3 channels)."""
    groups = [video[:, :, :1]] + list(video[:, :, 1:].split(4, dim=2))
    mean = torch.stack([torch.nn.functional.avg_pool2d(g.mean(2), 8) for g in groups], dim=2)
    return mean, torch.full_like(mean, -30.0)


def test_a3_absent_slot_is_an_unknown_latent_frame():
    g = torch.Generator().manual_seed(0)
    obj, background = (torch.rand(3, 16, 24, generator=g) * 2 - 1 for _ in range(2))
    stats = torch.zeros(3), torch.ones(3)
    full = reference_condition(stub_encode, [obj, obj, background], 13, torch.Generator(), *stats, sample=False)
    absent = reference_condition(stub_encode, [obj, None, background], 13, torch.Generator(), *stats, sample=False)
    assert absent[:4, 0].eq(1).all() and absent[:4, 1].eq(0).all() and absent[:4, 2].eq(1).all()
    assert absent[:4, 3].eq(0).all() and full[:4, :3].eq(1).all()
    assert torch.allclose(absent[4:, 1], torch.zeros(3, 2, 3))  # the mask slot is encoded grey
    assert torch.allclose(absent[4:, 2], full[4:, 2])  # the background keeps its latent frame
    # the reference's 1-reference layout (it crashes there): only latent frame 0 is known
    one = reference_condition(stub_encode, [obj], 9, torch.Generator(), *stats, sample=False)
    assert one[:4, 0].eq(1).all() and one[:4, 1:].eq(0).all()
    assert torch.equal(latent_mask(torch.tensor([1.0, 1, 1] + [0] * 10), 1, 1)[:, :2, 0, 0],
                       torch.tensor([[1.0, 1], [1, 1], [1, 0], [1, 0]]))  # repeat off: latent 1 half known


def test_multiref_batch_of_different_reference_counts_equals_separate_runs():
    config = tiny_dit_config("i2v", clip_dim=24, text_len=16)
    dit = MultiReferenceDiT(randomize(WanModel.from_config(config), std=0.1).eval())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 36, 3, 4, 6, generator=g)
    t = torch.tensor([900.0, 300.0])
    context = [torch.randn(5, 32, generator=g), torch.randn(9, 32, generator=g)]
    refs = [torch.randn(2 * 7, 24, generator=g), torch.randn(3 * 7, 24, generator=g)]
    with torch.no_grad():
        batched = dit(x, t, context, clip_fea=ReferenceTokens.from_list(refs))
        for i in range(2):
            alone = dit(x[i:i + 1], t[i:i + 1], context[i:i + 1], clip_fea=refs[i][None])
            assert torch.allclose(batched[i:i + 1], alone, atol=1e-5)
        # the padding is masked: without the mask, the shorter sample would differ
        unmasked = dit(x, t, context, clip_fea=ReferenceTokens.from_list(refs).tokens)
    assert not torch.allclose(unmasked[0], batched[0], atol=1e-3)


def test_a2_defaults_are_the_reference_ones():
    assert A2_DEFAULTS["sample_steps"] == 50 and A2_DEFAULTS["guide_scale"] == 5.0
    assert A2_DEFAULTS["size"] == "832*480" and A2_DEFAULTS["frame_num"] == 81
    assert A2_DEFAULTS["sample_shift"] == 8.0 and A2_DEFAULTS["negative_prompt"].endswith("walking backwards")


@pytest.fixture(scope="module")
def tiny_a2(tmp_path_factory):
    """What `scripts/make_tiny_checkpoint.py --task a2` writes."""
    from pipelines.extensions import extension_tasks

    return extension_tasks()["a2"].make_tiny(tmp_path_factory.mktemp("a2") / "tiny_a2", seed=0)


def test_a2_tiny_folder_has_the_released_layout(tiny_a2):
    for name in ("transformer", "image_encoder", "image_processor", "vae", "text_encoder", "tokenizer"):
        assert (tiny_a2 / name).is_dir(), name
    transformer = json.loads((tiny_a2 / "transformer" / "config.json").read_text())
    assert transformer["_class_name"] == "WanTransformer3DModel" and transformer["in_channels"] == 36
    from wan.checkpoint import read_checkpoint_keys

    keys = read_checkpoint_keys(tiny_a2 / "image_encoder")
    assert all(k.startswith("vision_model.") for k in keys)  # a CLIPVisionModel: no projection
    assert any(k.startswith("condition_embedder.image_embedder.") for k in read_checkpoint_keys(tiny_a2 / "transformer"))


def image(path, shape, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path.name


def test_a2_inference_with_one_two_and_three_references_writes_videos(tiny_a2, tmp_path):
    import inference

    subject, obj, background = (image(tmp_path / f"{n}.png", s, i) for i, (n, s) in
                                enumerate([("subject", (40, 30, 3)), ("object", (20, 50, 3)), ("bg", (30, 70, 3))]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{subject}\t\t\ta man\n{subject}\t{obj}\t\ta man with a ball\n"
                       f"{subject}\t{obj}\t{background}\ta man with a ball in a park\n")
    out = tmp_path / "out"
    code = inference.main(["--task", "a2", "--checkpoint_dir", str(tiny_a2), "--data_path", str(prompts),
                           "--output_folder", str(out), "--sample_steps", "2"])
    assert code == 0
    sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [s["references"] for s in sidecars] == [["subject"], ["subject", "object"],
                                                   ["subject", "object", "background"]]
    # 13 frames less the reference frames: 1, 5 and 9 of them
    assert [s["frames"] for s in sidecars] == [12, 8, 4]
    assert len(list(out.glob("*.mp4"))) == 3


def test_a3_edge_mask_from_binary_mask_and_cutout(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import make_edge_mask
    from make_edge_mask import binary_mask, edge_from_mask

    mask = np.zeros((20, 20), bool)
    mask[5:15, 4:16] = True
    edge = edge_from_mask(mask, width=2)
    assert edge[5:7, 4:16].all() and edge[13:15, 4:16].all() and edge[5:15, 4:6].all()
    assert not edge[7:13, 6:14].any() and not edge[~mask].any()
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = mask * 255
    assert np.array_equal(binary_mask(Image.fromarray(rgba)), mask)
    on_white = np.full((20, 20, 3), 255, np.uint8)
    on_white[mask] = (200, 30, 30)
    assert np.array_equal(binary_mask(Image.fromarray(on_white)), mask)
    assert np.array_equal(binary_mask(Image.fromarray((mask * 255).astype(np.uint8))), mask)
    src, dst = tmp_path / "m.png", tmp_path / "e.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(src)
    make_edge_mask.main([str(src), str(dst), "--width", "2"])
    assert np.array_equal(np.asarray(Image.open(dst))[..., 0] > 0, edge)
