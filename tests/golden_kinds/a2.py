"""Golden runners of SkyReels-A2 (multi-reference composition): the A2 transformer loaded from its
diffusers-layout weights, the reference preprocessing, and the reference condition (CLIP tokens and
the VAE condition of `prepare_latents`)."""

import numpy as np
import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from pipelines.references import clip_pixels, crop_resize, pad_resize, reference_condition
from wan.checkpoint import load_state_dict
from wan.convert.dit_diffusers import config_from_diffusers, dit_from_diffusers
from wan.convert.encoders_hf import clip_config_from_hf, clip_from_hf
from wan.modules.clip import VisionTransformer
from wan.modules.model import WanModel
from wan.modules.multiref import MultiReferenceDiT, ReferenceTokens

A2_TEXT_LEN = 512  # A2 splits its context with a hard-coded [:, :-512]

golden_dir(EXT_DIR / "a2" / "golden", "a2_transformer", "a2_preprocess", "a2_condition")


def assert_equal_uint8(actual, expected, name):
    actual = torch.from_numpy(np.array(actual))
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() == 0, f"{name}: {int((diff > 0).sum())} pixels differ (max {diff.max().item()})"


@runner("a2_transformer")
def run_a2_transformer(case):
    config = {**config_from_diffusers(case.config), "text_len": A2_TEXT_LEN}
    with torch.device("meta"):
        model = WanModel.from_config(config)
    model = load_state_dict(model, dit_from_diffusers(case.params), source=case.path.name).eval()
    x, t = case.inputs["hidden_states"], case.inputs["timestep"]
    tokens = case.inputs["encoder_hidden_states_image"]
    with torch.no_grad():
        out = MultiReferenceDiT(model)(x, t, case.inputs["encoder_hidden_states"],
                                       clip_fea=ReferenceTokens.from_list(list(tokens)))
    assert_close(out, case.outputs["sample"], name=f"{case.path.name} sample")
    if "noise_pred_guided" in case.outputs:  # batch [negative, positive]
        guided = out[:1] + case.meta["guidance_scale"] * (out[1:] - out[:1])
        assert_close(guided, case.outputs["noise_pred_guided"], name=f"{case.path.name} guided")


def run_pad_crop(case):
    helpers = {"_crop_and_resize_pad": pad_resize, "_crop_and_resize": crop_resize}
    for call in case.config["calls"]:
        image = case.inputs[call["image"]].numpy()
        result = helpers[call["fn"]](image, call["height"], call["width"])
        assert_equal_uint8(result, case.outputs[call["out"]], f"{case.path.name} {call['out']}")


def run_preprocess_clip(case):
    size = case.config["processor"]["size"]["height"]
    for i in range(len(case.config["roles"])):
        image = case.inputs[f"image_{i}"].numpy()
        padded = pad_resize(image, case.config["pad_height"], case.config["pad_width"])
        assert_equal_uint8(padded, case.outputs[f"padded512_{i}"], f"{case.path.name} padded512_{i}")
        assert_close(clip_pixels(image, size)[None], case.outputs[f"pixel_values_{i}"],
                     name=f"{case.path.name} pixel_values_{i}")


def run_preprocess_vae(case):
    height, width = case.config["height"], case.config["width"]
    for i, fn in enumerate(case.config["fns"]):
        image = case.inputs[f"image_{i}"].numpy()
        resized = (crop_resize(image, height, width) if fn == "_crop_and_resize"
                   else pad_resize(image, height, width))
        assert_equal_uint8(resized, case.outputs[f"resized_{i}"], f"{case.path.name} resized_{i}")
        pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 * 2 - 1
        assert_close(pixels[None, :, None], case.outputs[f"image_vae_{i}"], name=f"{case.path.name} image_vae_{i}")


@runner("a2_preprocess")
def run_a2_preprocess(case):
    {"pad_crop": run_pad_crop, "clip": run_preprocess_clip, "vae": run_preprocess_vae}[case.meta["part"]](case)


def stub_encoder(case):
    """The meta note's stub VAE: each 1 + 4k frame group averaged, 8x8 average-pooled, mapped 3 -> 16."""
    weight, bias = case.inputs["stub_W"], case.inputs["stub_b"]
    stride = case.config["vae_scale_factor_spatial"]

    def encode(video):
        groups = [video[:, :, :1]] + list(video[:, :, 1:].split(case.config["vae_scale_factor_temporal"], dim=2))
        pooled = torch.stack([torch.nn.functional.avg_pool2d(g.mean(2), stride) for g in groups], dim=2)
        mean = torch.einsum("ck,bkthw->bcthw", weight, pooled) + bias.view(1, -1, 1, 1, 1)
        return mean, torch.full_like(mean, case.config["stub_logvar"])
    return encode


def run_condition_vae(case):
    cfg = case.config
    refs = [case.inputs[f"ref_{i}"][0, :, 0] for i in range(cfg["n_refs"])]
    generator = torch.Generator().manual_seed(cfg["seed"])
    latent_frames = (cfg["num_frames"] - 1) // cfg["vae_scale_factor_temporal"] + 1
    shape = (cfg["batch_size"], cfg["z_dim"], latent_frames, cfg["height"] // 8, cfg["width"] // 8)
    noise = torch.randn(shape, generator=generator)  # the reference draws the noise first
    assert_close(noise, case.outputs["latents"], name=f"{case.path.name} latents")
    condition = reference_condition(stub_encoder(case), refs, cfg["num_frames"], generator,
                                    case.inputs["latents_mean"], case.inputs["latents_std"],
                                    repeat=cfg["vae_repeat"])
    condition = condition[None].expand(cfg["batch_size"], -1, -1, -1, -1)
    assert_close(condition, case.outputs["condition"], name=f"{case.path.name} condition")
    assert_close(condition[:, :4], case.outputs["mask"], name=f"{case.path.name} mask")


def run_condition_clip(case):
    cfg = case.config
    state = clip_from_hf(case.params)
    with torch.device("meta"):
        model = VisionTransformer(**clip_config_from_hf(cfg["clip_vision"], has_projection=False))
    model = load_state_dict(model, state, source=case.path.name).eval()
    hidden = []
    with torch.no_grad():
        for i in range(cfg["n_refs"]):
            hidden.append(model(case.inputs[f"pixel_values_{i}"]))
            assert_close(hidden[-1], case.outputs[f"hidden_{i}"], name=f"{case.path.name} hidden_{i}")
    tokens = torch.cat(hidden, dim=1).expand(cfg["batch_size"], -1, -1)
    assert_close(tokens, case.outputs["image_embeds"], name=f"{case.path.name} image_embeds")


@runner("a2_condition")
def run_a2_condition(case):
    {"vae": run_condition_vae, "clip": run_condition_clip}[case.meta["part"]](case)
