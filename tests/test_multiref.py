"""Multi-reference composition (SkyReels-A2 checkpoints, A3 object / mask / background): checkpoint
layouts, reference preprocessing and condition, the pipeline end to end, edge masks.
(Golden parity with the reference code: tests/golden_kinds/a2.py through tests/test_golden.py.)"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, randomize, run_inference_main, state_shapes, tiny_dit_config
from golden_kinds import EXT_DIR
from pipelines.multiref import A2_DEFAULTS
from pipelines.references import A3_SLOTS, clip_pixels, latent_mask, reference_condition, vae_pixels
from wan.convert.dit_diffusers import config_from_diffusers, config_to_diffusers, dit_from_diffusers, dit_to_diffusers
from wan.convert.encoders_hf import clip_to_hf
from wan.configs import get_preset
from wan.modules.clip import VisionTransformer
from wan.modules.model import WanModel
from wan.modules.multiref import MultiReferenceDiT, ReferenceTokens

A2_MANIFESTS = EXT_DIR / "a2" / "manifests"

pytestmark = pytest.mark.usefixtures("single_thread")



def manifest(name):
    return json.loads((A2_MANIFESTS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def a2_14B():
    """The released A2 transformer on the meta device: its config is Wan2.1-I2V-14B's."""
    with torch.device("meta"):
        return WanModel.from_config(config_from_diffusers(config_to_diffusers(get_preset("i2v-14B").dit)))


def base_state(model):
    """The state dict without LoRA tensors (a LoRA module keeps its base's names)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


def test_a2_transformer_state_dict_matches_manifest(a2_14B):
    """In diffusers key names, through the DiT key table."""
    expected = manifest("a2_14B")
    assert state_shapes(dit_to_diffusers(base_state(a2_14B))) == expected["keys"]
    assert sum(v.numel() for v in base_state(a2_14B).values()) == expected["num_params"]


def test_a2_transformer_ignores_the_unused_norm_added_q_key():
    config = tiny_dit_config("i2v", clip_dim=24)
    state = dit_to_diffusers(WanModel.from_config(config).state_dict())
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(config["dim"])  # listed, never created, by A2
    model = WanModel.from_config(config)
    model.load_state_dict(dit_from_diffusers(state))


def test_a2_image_encoder_hf_state_dict_matches_manifest():
    """A2's image encoder is a transformers CLIPVisionModel (ViT-H/14, no projection)."""
    with torch.device("meta"):
        model = VisionTransformer(out_dim=None)
    expected = manifest("a2_image_encoder_hf")
    assert state_shapes(clip_to_hf(model.state_dict())) == expected["keys"]
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
    subject, obj, background = (image(tmp_path / f"{n}.png", s, i) for i, (n, s) in
                                enumerate([("subject", (40, 30, 3)), ("object", (20, 50, 3)), ("bg", (30, 70, 3))]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{subject}\t\t\ta man\n{subject}\t{obj}\t\ta man with a ball\n"
                       f"{subject}\t{obj}\t{background}\ta man with a ball in a park\n")
    out = tmp_path / "out"
    code = run_inference_main("--task", "a2", "--checkpoint_dir", tiny_a2, "--data_path", prompts,
                              "--output_folder", out, "--sample_steps", 2)
    assert code == 0
    sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [s["references"] for s in sidecars] == [["subject"], ["subject", "object"],
                                                   ["subject", "object", "background"]]
    # 13 frames less the reference frames: 1, 5 and 9 of them
    assert [s["frames"] for s in sidecars] == [12, 8, 4]
    assert len(list(out.glob("*.mp4"))) == 3


def test_a3_pipeline_batch_of_different_slots_equals_separate_seeded_runs(tiny_a2):
    """The reference breaks on batches; here prompt i of a batch is the run of seed + i alone, with
    noise drawn on the CPU (the same on every device)."""
    from pipelines.loading import load_components
    from pipelines.multiref import A3_SLOTS, MultiReferencePipeline, a2_preset
    from pipelines.wan_video import SampleSettings

    preset = a2_preset(tiny_a2).with_overrides(sizes=("32*32",))
    pipeline = MultiReferencePipeline(load_components(tiny_a2, "i2v"), A3_SLOTS, packed=False, preset=preset)
    rng = np.random.default_rng(0)
    obj, mask, background = (rng.integers(0, 256, s, dtype=np.uint8) for s in [(20, 30, 3), (16, 16, 3), (30, 20, 3)])
    settings = SampleSettings(sample_steps=2, seed=5)
    batch = pipeline.generate(["a ball", "a ball on grass"], [[obj, None, None], [obj, mask, background]],
                              settings, progress=False)
    alone = pipeline.generate(["a ball on grass"], [[obj, mask, background]], SampleSettings(sample_steps=2, seed=6),
                              progress=False)[0]
    assert [v.shape for v in batch] == [(3, 4, 32, 32)] * 2  # 13 frames less the 9 of the 3 slots
    assert torch.allclose(batch[1], alone, atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


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


# -- A3 training --------------------------------------------------------------------------------------


def test_a3_lora_rank16_is_0_08_percent_of_a2_14B(a2_14B):
    from wan.lora import count_parameters, inject_lora, parameter_report
    from trainers.multiref import official_target

    targets = [official_target("blocks.*.attn2.add_k_proj"), official_target("blocks.*.cross_attn.v_img")]
    assert targets == ["blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"]
    model = a2_14B
    names = inject_lora(model, targets, rank=16)
    trainable, total = count_parameters(model)
    assert len(names) == 80 and trainable == 80 * 819_200 // 80 * 16 == 13_107_200
    assert total - trainable == 16_394_878_784
    assert "(0.08%)" in parameter_report(model)


def test_a3_dropout_rates_match_the_config():
    from trainers.multiref import draw_dropout

    present = torch.tensor([[True, True, True]] * 3000 + [[True, False, True]] * 1000)
    kept = draw_dropout(present, 0.3, 0.6, torch.Generator().manual_seed(0))
    assert kept[:, 0].all() and not kept[3000:, 1].any()  # the object stays; an absent mask stays absent
    assert abs((~kept[:3000, 1]).float().mean().item() - 0.3) < 0.03
    assert abs((~kept[:, 2]).float().mean().item() - 0.6) < 0.03


def test_a3_training_inputs_follow_the_drawn_dropout(a3_run):
    """On the cached samples (object only; + mask; + mask + background; both rates 0.5): the observed
    drop rates match the config, and a dropped slot takes its CLIP tokens and its latent frame away."""
    from trainers.data import collate

    trainer = a3_run.trainer
    dataset = trainer.dataset()
    batch = collate([dataset[(i, 0)] for i in range(3)])
    tokens_per_slot = batch["clip_object"].shape[1]
    dropped = np.zeros(2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        inputs, rates = trainer.prepare(batch, generator)
        dropped += [rates["mask_dropped"], rates["background_dropped"]]
        known = inputs["y"][:, :4].amax(dim=(1, 3, 4))[:, :3] > 0  # [B, slot]: latent frame known
        assert torch.equal(inputs["clip_fea"].lengths, known.sum(1) * tokens_per_slot)
        assert known[:, 0].all() and not known[0, 1:].any() and not known[1, 2]
    # 2 of 3 samples have a mask, 1 of 3 a background, each dropped with probability 0.5
    assert abs(dropped[0] / 300 - 0.5 * 2 / 3) < 0.06 and abs(dropped[1] / 300 - 0.5 / 3) < 0.05


def test_a3_latent_cache_equals_online_encoding(a3_run):
    from trainers.data import collate
    from trainers.multiref import ReferenceVideoDataset

    trainer, cfg = a3_run.trainer, a3_run.cfg
    cached = trainer.dataset()
    raw = ReferenceVideoDataset(cfg.data.path, cfg.data.num_frames, cfg.data.frame_stride, cfg.data.height,
                                cfg.data.width, cached.clip_size, cfg.seed, cache_dir=None)
    for seed in range(2):  # the same draws give the same drop patterns
        online, _ = trainer.prepare(collate([raw[(i, 0)] for i in range(3)]), torch.Generator().manual_seed(seed))
        stored, _ = trainer.prepare(collate([cached[(i, 0)] for i in range(3)]), torch.Generator().manual_seed(seed))
        for key in ("latents", "y"):
            assert torch.allclose(online[key], stored[key], atol=1e-5), key
        assert torch.allclose(online["clip_fea"].tokens, stored["clip_fea"].tokens, atol=1e-5)
        assert all(torch.allclose(a, b) for a, b in zip(online["context"], stored["context"]))


def write_a3_dataset(folder):
    """3 complete samples (object only; + mask; + mask + background) and one missing its video and object."""
    import imageio

    folder.mkdir()
    for i in range(3):
        name = f"{i:03d}"
        ramp = np.linspace(0, 255, 48)[None, :, None]
        frames = [np.clip(ramp + 12 * t, 0, 255).astype(np.uint8).repeat(32, 0).repeat(3, 2) for t in range(6)]
        imageio.mimwrite(folder / f"{name}.mp4", frames, fps=8, macro_block_size=1)
        (folder / f"{name}.txt").write_text(f"clip {i}")
        image(folder / f"{name}_object.png", (20, 30, 3), 10 * i)
        if i >= 1:
            image(folder / f"{name}_mask.png", (20, 20, 3), 10 * i + 1)
        if i == 2:
            image(folder / f"{name}_background.png", (30, 40, 3), 10 * i + 2)
    (folder / "003.txt").write_text("no video")


def write_a3_run(root, tiny_a2, max_steps=16, transformer_dtype="float32"):
    """A tiny A3 LoRA config (diffusion-pipe style TOML) and its dataset under `root`."""
    write_a3_dataset(root / "data")
    (root / "dataset.toml").write_text('directory = "data"\nresolution = [16, 32]\nframes = 13\n'
                                       'mask_dropout = 0.5\nbackground_dropout = 0.5\ncache_latents = true\n')
    (root / "a3.toml").write_text(f"""
output_dir = "run"
dataset = "dataset.toml"
max_steps = {max_steps}
save_every_n_steps = {max_steps}
[model]
ckpt_path = "{tiny_a2}"
dtype = "float32"
transformer_dtype = "{transformer_dtype}"
[adapter]
type = "lora"
rank = 4
alpha = 4
target_modules = ["blocks.*.attn2.add_k_proj", "blocks.*.cross_attn.v_img"]
[optimizer]
type = "adamw"
lr = 2e-2
[checkpoint]
export_dtype = "fp32"
""")
    return root / "a3.toml"


def train_a3(config_path):
    """`train.py --config_path a3.toml` (no --logdir: the run goes to the TOML's output_dir); returns
    the run with its trainer kept."""
    import train as train_script
    from trainers.config import load_config
    from trainers.multiref import MultiReferenceTrainer

    trainers = []
    original_init = MultiReferenceTrainer.__init__

    def keep(self, *args):
        original_init(self, *args)
        trainers.append(self)
    MultiReferenceTrainer.__init__ = keep
    try:
        train_script.main(["--config_path", str(config_path), "data.num_workers=0"])
    finally:
        MultiReferenceTrainer.__init__ = original_init
    cfg = load_config(config_path, ["data.num_workers=0"])
    history = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(root=config_path.parent, cfg=cfg, history=history, trainer=trainers[0],
                           export=Path(cfg.output_dir) / "checkpoints" / f"step_{cfg.train.max_steps:06d}")


@pytest.fixture(scope="module")
def a3_run(tiny_a2, tmp_path_factory):
    """A tiny A3 LoRA run from a diffusion-pipe style TOML, through the shared loop; keeps the trainer."""
    return train_a3(write_a3_run(tmp_path_factory.mktemp("a3"), tiny_a2))


def test_a3_toml_maps_onto_the_shared_config(a3_run):
    cfg = a3_run.cfg
    assert cfg.trainer == "multiref" and cfg.output_dir == str(a3_run.root / "run")
    assert list(cfg.lora.targets) == ["blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"]
    assert (cfg.lora.rank, cfg.data.num_frames, cfg.data.height, cfg.data.width) == (4, 13, 16, 32)
    assert cfg.multiref.mask_dropout == 0.5 and cfg.model.checkpoint.endswith("transformer")


def test_a3_shipped_config_parses_with_rank_16(a3_run, tmp_path):
    from trainers.config import load_config

    text = (REPO_ROOT / "configs" / "a3_lora.toml").read_text()
    text = text.replace('"checkpoints/SkyReels-A2"', f'"{a3_run.cfg.model.checkpoint[:-len("/transformer")]}"')
    (tmp_path / "a3_dataset.toml").write_text(f'directory = "{a3_run.root / "data"}"\nframes = 13\n')
    (tmp_path / "a3_lora.toml").write_text(text)
    cfg = load_config(tmp_path / "a3_lora.toml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.diffusion.shift, cfg.multiref.background_dropout) == (16, 16, 8.0, 0.3)
    assert list(cfg.lora.targets) == ["blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"]


def test_a3_sample_missing_a_required_file_is_reported_by_name(a3_run, caplog):
    from trainers.multiref import scan_folder

    with caplog.at_level("WARNING"):
        assert scan_folder(a3_run.root / "data") == ["000", "001", "002"]
    assert "skipping sample 003: missing 003.mp4, 003_object.png" in caplog.text


def test_a3_cache_latents_script_points_to_the_trainer_cache(a3_run):
    from scripts.cache_latents import cache_latents
    from trainers.config import ConfigError

    with pytest.raises(ConfigError, match="cache_latents = true in the dataset TOML"):
        cache_latents(a3_run.cfg, a3_run.root / "elsewhere")


def test_a3_bad_toml_keys_fail_with_clear_errors(a3_run, tmp_path):
    from trainers.config import ConfigError, load_config

    text = (a3_run.root / "a3.toml").read_text().replace('dataset = "dataset.toml"',
                                                        f'dataset = "{a3_run.root / "dataset.toml"}"')
    for old, new, message in [('type = "lora"', 'type = "lokr"', "adapter.type must be 'lora'"),
                              ('transformer_dtype = "float32"', 'transformer_dtype = "float16"',
                               "model.transformer_dtype must be one of"),
                              ('max_steps = 16', 'epochs = 3', "unknown key(s) ['epochs']")]:
        path = tmp_path / "bad.toml"
        path.write_text(text.replace(old, new))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)


def test_a3_lora_run_lowers_the_loss_and_changes_only_lora_weights(a3_run, caplog):
    from trainers.data import collate
    from wan.lora import set_lora_scale

    trainer = a3_run.trainer
    assert len(a3_run.history) == 16 and all(np.isfinite([r["loss"] for r in a3_run.history]))
    dataset = trainer.dataset()
    assert dataset.names == ["000", "001", "002"]  # 003 (no video, no object) was reported and skipped
    assert sorted(p.name for p in dataset.cache_dir.glob("*.safetensors")) == [f"{i:03d}.safetensors" for i in range(3)]
    batch = collate([dataset[(i, 0)] for i in range(3)])
    assert "latents_11" in batch  # read back from the latent cache

    def mean_loss():
        with torch.no_grad():
            return np.mean([trainer.loss(batch, torch.Generator().manual_seed(s))[0].item() for s in range(6)])
    trained = mean_loss()
    set_lora_scale(trainer.dit_model, 0.0)  # lora_B starts at zero: scale 0 is the model before training
    initial = mean_loss()
    set_lora_scale(trainer.dit_model, 1.0)
    assert trained < 0.97 * initial, (trained, initial)

    start = trainer.initial_state()
    for key, value in trainer.model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP-sharded in the loop
        if ".lora_B." in key:
            assert not torch.equal(value, start[key]), key
        elif ".lora_A." not in key:
            assert torch.equal(value, start[key].to(value.dtype)), f"{key} changed"


def test_a3_saved_lora_loads_in_diffusers_and_gives_our_output(a3_run, tiny_a2):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from wan.lora import fuse_lora
    from wan.model_loading import load_dit

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 36, 2, 4, 4, generator=g), torch.tensor([700])
    text = torch.zeros(1, 512, 32)  # diffusers and A2 split image from text tokens at a fixed 512
    text[:, :6] = torch.randn(1, 6, 32, generator=g)
    image_tokens = torch.randn(1, 3 * 5, 32, generator=g)  # 3 references of the tiny CLIP's 5 tokens
    ours = load_dit(tiny_a2 / "transformer").eval()
    fuse_lora(ours, a3_run.export / "lora.safetensors")
    with torch.no_grad():
        expected = ours(x, t, text, clip_fea=image_tokens)
        base = WanTransformer3DModel.from_pretrained(tiny_a2 / "transformer").eval()
        unadapted = base(x, t, text, encoder_hidden_states_image=image_tokens, return_dict=False)[0]
    assert (expected - unadapted).abs().max() > 1e-3  # the LoRA matters
    files = {"diffusers": a3_run.export / "lora_diffusers.safetensors",
             "comfyui": a3_run.export / "lora.safetensors"}
    for name, path in files.items():
        transformer = WanTransformer3DModel.from_pretrained(tiny_a2 / "transformer").eval()
        state = WanImageToVideoPipeline.lora_state_dict(str(path))  # what load_lora_weights reads
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name="a3")
        with torch.no_grad():
            out = transformer(x, t, text, encoder_hidden_states_image=image_tokens, return_dict=False)[0]
        assert torch.allclose(out, expected, atol=1e-4), f"{name}: {(out - expected).abs().max()}"


def test_a3_float8_base_trains_the_lora(tiny_a2, tmp_path):
    """transformer_dtype = 'float8': the blocks' frozen linear weights are FP8Linear (fp8 storage, as
    quantized from the checkpoint) through the loop's start-up broadcast; the LoRA trains."""
    from wan.fp8 import FP8, FP8Linear
    from wan.lora import LoRALinear

    run = train_a3(write_a3_run(tmp_path, tiny_a2, max_steps=3, transformer_dtype="float8"))
    assert run.cfg.multiref.fp8_base and run.cfg.model.frozen_dtype == "fp32"
    assert len(run.history) == 3 and all(np.isfinite([r["loss"] for r in run.history]))
    dit, start = run.trainer.dit_model, run.trainer.initial_state()
    ffn, k_img = dit.blocks[0].ffn[0], dit.blocks[0].cross_attn.k_img
    assert isinstance(ffn, FP8Linear) and ffn.weight.dtype == FP8 and ffn.scale_weight.item() != 1.0
    assert torch.equal(ffn.weight.full_tensor().view(torch.uint8), start["model.blocks.0.ffn.0.weight"].view(torch.uint8))
    assert isinstance(k_img, LoRALinear) and k_img.weight.dtype == torch.float32  # LoRA-wrapped: not quantized
    lora_B = k_img.lora_B.weight
    assert not torch.equal(lora_B.full_tensor() if hasattr(lora_B, "full_tensor") else lora_B,
                           start["model.blocks.0.cross_attn.k_img.lora_B.weight"])
