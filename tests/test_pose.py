"""Pose-driven animation (UniAnimate-DiT): the pose CNNs' and the release's key layouts, loading the
release (LoRA merge, prefixed CNN weights), the causal model under the pose condition against the
bidirectional one, per-block slicing of the pose tokens, and tiny pose pipelines end to end."""

import json
from argparse import Namespace

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, randomize, run_inference_main, state_shapes, tiny_dit_config
from golden_kinds import EXT_DIR
from pipelines.causal import CausalPipeline
from pipelines.extensions import extension_tasks
from pipelines.pose import load_pose_inputs
from pipelines.prompt_file import PromptJob
from pipelines.validation import InvalidInput
from pipelines.wan_video import SampleSettings
from wan.checkpoint import CheckpointError, save_state_dict
from wan.configs import get_preset
from wan.convert.unianimate import (UNIANIMATE_LORA_TARGETS, load_unianimate, split_unianimate_state,
                                    unianimate_state)
from wan.lora import inject_lora
from wan.modules.causal_model import CausalWanModel
from wan.modules.model import WanModel
from wan.modules.pose import PoseEncoder, features_to_tokens

MANIFESTS = EXT_DIR / "pose" / "manifests"
POSE_DIM = 24  # narrow pose tokens for the tiny models (the release's are 5120 wide)


def manifest(name):
    return json.loads((MANIFESTS / f"{name}.json").read_text())


# -- key layouts -------------------------------------------------------------------------------------

def test_pose_modules_match_release_manifest():
    with torch.device("meta"):
        encoder = PoseEncoder()  # the 14B: pose_proj is the identity
    expected = manifest("unianimate_pose_modules")
    assert state_shapes(encoder.state_dict()) == expected["keys"]
    assert sum(p.numel() for p in encoder.parameters()) == expected["num_params"]


def test_pose_proj_1_3B_matches_manifest():
    with torch.device("meta"):
        encoder = PoseEncoder(dim=get_preset("t2v-1.3B").dit["dim"], ref_channels=0)
    expected = manifest("pose_proj_1.3B")
    assert state_shapes(encoder.pose_proj.state_dict()) == {k[len("pose_proj."):]: v
                                                            for k, v in expected["keys"].items()}
    assert sum(p.numel() for p in encoder.pose_proj.parameters()) == expected["num_params"]
    assert not encoder.has_reference_pose  # the T2V 1.3B has no `y` for the reference pose


def test_pose_release_checkpoint_manifest_after_key_conversion():
    with torch.device("meta"):
        dit = WanModel(**get_preset("i2v-14B").dit)
        encoder = PoseEncoder()
    base = manifest("unianimate_dit_wan2.1_i2v_14B")
    assert state_shapes(dit.state_dict()) == base["keys"]  # UniAnimate adds no DiT keys
    rank = manifest("unianimate_lora_r128")["keys"]["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"][0]
    inject_lora(dit, UNIANIMATE_LORA_TARGETS, rank=rank)
    release = manifest("unianimate_ckpt_r128")
    assert state_shapes(unianimate_state(encoder, dit)) == release["keys"]
    # and back: the release's keys split into exactly our pose modules and LoRA parameters
    pose, lora, rest = split_unianimate_state({k: torch.empty(v, device="meta") for k, v in release["keys"].items()})
    assert not rest
    assert state_shapes(pose) == state_shapes(encoder.state_dict())
    assert state_shapes(lora) == state_shapes({k: v for k, v in dit.state_dict().items() if ".lora_" in k})


# -- loading ----------------------------------------------------------------------------------------

def tiny_i2v(seed=0):
    return randomize(WanModel(**tiny_dit_config("i2v")), seed=seed).eval()


def test_pose_release_loads_with_merged_lora_and_prefixed_cnn_files(tmp_path):
    dit = tiny_i2v()
    trained = tiny_i2v()
    inject_lora(trained, UNIANIMATE_LORA_TARGETS, rank=4)
    randomize(trained, seed=1)  # non-zero lora_B
    encoder = randomize(PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM), seed=2)
    release = unianimate_state(encoder, trained)
    # the release holds the CNNs and the LoRA; pose_proj comes in another file under a training prefix
    cnn_and_lora = {k: v for k, v in release.items() if not k.startswith("pose_proj.")}
    save_state_dict(cnn_and_lora, tmp_path / "release.safetensors")
    save_state_dict({f"module.model.{k}": v for k, v in release.items() if k.startswith("pose_proj.")},
                    tmp_path / "pose_proj.safetensors")

    loaded = PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM)
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    names = load_unianimate(dit, loaded, [tmp_path / "release.safetensors", tmp_path / "pose_proj.safetensors"])
    assert len(names) == 10 * len(dit.blocks)
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    q = trained.blocks[1].self_attn.q
    merged = base["blocks.1.self_attn.q.weight"] + q.lora_B.weight @ q.lora_A.weight  # W += B @ A, no alpha / r
    torch.testing.assert_close(dit.blocks[1].self_attn.q.weight, merged, rtol=0, atol=1e-6)
    assert torch.equal(dit.blocks[1].cross_attn.k_img.weight, base["blocks.1.cross_attn.k_img.weight"])

    with pytest.raises(CheckpointError, match="no pose_proj for a DiT of width 64"):
        load_unianimate(tiny_i2v(), PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM), [tmp_path / "release.safetensors"])
    save_state_dict({**cnn_and_lora, "img_emb.proj.1.weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="neither pose modules"):
        load_unianimate(tiny_i2v(), PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM), [tmp_path / "foreign.safetensors"])


# -- the pose condition on the bidirectional and the causal model -------------------------------------

@pytest.fixture(scope="module")
def posed():
    """A tiny i2v DiT with peaked attention, a pose encoder and the whole-video conditions of a
    21-pixel-frame pose video (6 latent frames of 2 x 2 tokens)."""
    dit = tiny_i2v()
    with torch.no_grad():
        for block in dit.blocks:
            block.self_attn.norm_q.weight.add_(2.0)
            block.self_attn.norm_k.weight.add_(2.0)
    encoder = randomize(PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM), std=0.3, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    pose_video = torch.rand(1, 3, 21, 64, 64, generator=g)
    x = torch.randn(1, 16, 6, 8, 8, generator=g)
    with torch.no_grad():
        y = encoder.condition_y(torch.randn(1, 20, 6, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g))
        tokens = encoder.pose_tokens(pose_video)
    return dict(dit=dit, encoder=encoder, pose_video=pose_video, x=x, y=y, tokens=tokens,
                context=torch.randn(1, 5, 32, generator=g), clip_fea=torch.randn(1, 257, 1280, generator=g))


@torch.no_grad()
def test_pose_causal_one_block_equals_bidirectional(posed):
    dit, x, context = posed["dit"], posed["x"], posed["context"]
    kwargs = dict(y=posed["y"], clip_fea=posed["clip_fea"], add_condition=posed["tokens"])
    t = torch.tensor([700.0])
    expected = dit(x, t, context, **kwargs)
    causal = CausalWanModel(dit, num_frame_per_block=x.shape[2])
    torch.testing.assert_close(causal(x, t, context, **kwargs), expected, rtol=0, atol=1e-5)
    block = causal.forward_block(x, t, 0, causal.new_kv_cache(), causal.cross_cache(context, posed["clip_fea"]),
                                 y=posed["y"], add_condition=posed["tokens"])
    torch.testing.assert_close(block, expected, rtol=0, atol=1e-5)
    assert (dit(x, t, context, y=posed["y"], clip_fea=posed["clip_fea"]) - expected).abs().max() > 1e-2


def test_pose_block_slices_equal_full_sequence_embedding(posed):
    """Block k takes tokens [3k * hw, (3k + 3) * hw) of the embedding of the whole pose video: the
    features of its latent frames; re-embedding the block's own pose frames gives other values."""
    encoder, tokens, video = posed["encoder"], posed["tokens"], posed["pose_video"]
    with torch.no_grad():
        features = encoder.dwpose_embedding(video)
        hw = features.shape[3] * features.shape[4]
        for k in range(2):
            block = tokens[:, 3 * k * hw:(3 * k + 3) * hw]
            torch.testing.assert_close(block, encoder.pose_proj(features_to_tokens(features[:, :, 3 * k:3 * k + 3])))
        window = encoder.pose_tokens(video[:, :, 12:21])  # block 1's pose frames, re-embedded alone
    assert (window - tokens[:, 3 * hw:]).abs().max() > 1e-3


class Recorder:
    """Wraps a causal model and records the conditions each forward_block receives."""

    def __init__(self, causal):
        self.causal, self.calls = causal, []

    def __getattr__(self, name):
        return getattr(self.causal, name)

    def forward_block(self, x, t, start, kv, cross, **inputs):
        self.calls.append((start, kv, inputs))
        return self.causal.forward_block(x, t, start, kv, cross, **inputs)


@torch.no_grad()
def test_pose_causal_generation_slices_conditions_per_block(posed):
    """Each block gets its slice of the whole video's pose tokens on the conditional branch only (its
    steps and its cache rerun), and its frames of y on both branches."""
    dit, context, y, tokens = posed["dit"], posed["context"], posed["y"], posed["tokens"]
    causal = Recorder(CausalWanModel(dit, num_frame_per_block=3))
    pipe = CausalPipeline.multi_step(causal, solver="euler", num_steps=2, guide_scale=2.0)
    noise = posed["x"]
    negative = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(5))
    latents = torch.cat(list(pipe.generate(context, 6, (8, 8), negative_context=negative, noise=noise, y=y,
                                           clip_fea=posed["clip_fea"], add_condition=tokens)), dim=2)
    hw = 16  # 8 x 8 latent, 2 x 2 patches
    cond_kv = causal.calls[0][1]
    for start, kv, inputs in causal.calls:
        torch.testing.assert_close(inputs["y"], y[:, :, start:start + 3], rtol=0, atol=0)
        if kv is cond_kv:
            torch.testing.assert_close(inputs["add_condition"], tokens[:, start * hw:(start + 3) * hw], rtol=0, atol=0)
        else:
            assert "add_condition" not in inputs
    assert {start for start, _, _ in causal.calls} == {0, 3}
    assert len(causal.calls) == 2 * (2 + 2 + 1)  # two branches: 2 steps per block, one cache rerun
    assert latents.shape == noise.shape


@torch.no_grad()
def test_pose_cached_blocks_equal_block_causal_forward(posed):
    """Block by block over the KV cache with per-block slices of y and the pose tokens equals the
    whole clip under the block-causal mask with the whole-video conditions."""
    dit, context, y, tokens, x = posed["dit"], posed["context"], posed["y"], posed["tokens"], posed["x"]
    causal = CausalWanModel(dit, num_frame_per_block=3)
    t = torch.tensor([500.0])
    expected = causal(x, t, context, posed["clip_fea"], y=y, add_condition=tokens)
    kv, cross = causal.new_kv_cache(), causal.cross_cache(context, posed["clip_fea"])
    blocks = [causal.forward_block(x[:, :, s:s + 3], t, s, kv, cross, y=y[:, :, s:s + 3],
                                   add_condition=tokens[:, s * 16:(s + 3) * 16]) for s in (0, 3)]
    torch.testing.assert_close(torch.cat(blocks, dim=2), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_pose_trainer_model_equals_the_inference_conditioning(posed):
    """The trained module adds the same reference-pose features to y and pose tokens as the pipelines;
    a dropped sample (keep 0) gets neither."""
    from trainers.pose import PoseConditionedWan

    dit, encoder, x, context = posed["dit"], posed["encoder"], posed["x"], posed["context"]
    g = torch.Generator().manual_seed(7)
    y, ref_pose = torch.randn(1, 20, 6, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    t, clip_fea = torch.tensor([300.0]), posed["clip_fea"]
    model = PoseConditionedWan(dit, encoder)
    for keep, expected in (
            (1.0, dit(x, t, context, y=encoder.condition_y(y, ref_pose), clip_fea=clip_fea,
                      add_condition=encoder.pose_tokens(posed["pose_video"]))),
            (0.0, dit(x, t, context, y=y, clip_fea=clip_fea))):
        out = model(torch.cat([x, y], 1), t, context, clip_fea, pose_video=posed["pose_video"], ref_pose=ref_pose,
                    keep=torch.tensor([keep]))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# -- preprocessing and the pipelines, end to end ------------------------------------------------------

def write_pose_folder(folder, shift, frames=7, size=64):
    """Rendered-pose-like frames: a coloured bar on black moving down by `shift` pixels per frame."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(frames):
        image = np.zeros((size, size, 3), np.uint8)
        top = 8 + i * shift
        image[top:top + 12, 20:44] = (0, 85, 255)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    Image.fromarray(np.full((size, size, 3), 60, np.uint8)).save(folder / "pose.jpg")
    return folder


def test_pose_preprocessing_repeats_last_frame_and_reads_reference_pose(tmp_path):
    folder = write_pose_folder(tmp_path / "poses", shift=4, frames=7)
    video, ref = load_pose_inputs(folder, 9, 32, 48)
    assert video.shape == (3, 9, 32, 48) and ref.shape == (3, 32, 48)
    assert 0 <= video.min() and video.max() <= 1 and video.max() > 0.9
    assert torch.equal(video[:, 7], video[:, 6]) and torch.equal(video[:, 8], video[:, 6])
    assert not torch.equal(video[:, 5], video[:, 6])
    torch.testing.assert_close(ref, torch.full_like(ref, 60 / 255), rtol=0, atol=2 / 255)


def test_pose_preprocessing_reads_mp4_with_its_reference_pose(tmp_path):
    import imageio.v2 as imageio
    from PIL import Image

    frames = np.zeros((3, 32, 48, 3), np.uint8)
    for i in range(3):
        frames[i, 4 + 8 * i:12 + 8 * i, 8:40] = 255
    imageio.mimwrite(tmp_path / "dance.mp4", frames, fps=8, macro_block_size=1)
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "dance_pose.png")
    video, ref = load_pose_inputs(tmp_path / "dance.mp4", 5, 32, 48)
    assert video.shape == (3, 5, 32, 48)
    torch.testing.assert_close(video[:, :3].mean((0, 3)), torch.from_numpy(frames).float().mean((2, 3)) / 255,
                               rtol=0, atol=0.1)  # the bars' rows, through H.264
    assert torch.equal(video[:, 4], video[:, 2])
    torch.testing.assert_close(ref, torch.full_like(ref, 200 / 255), rtol=0, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="pose folder .* holds no images"):
        load_pose_inputs(tmp_path / "empty", 5, 32, 48)


@pytest.fixture(scope="module")
def tiny_pose(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    tasks = extension_tasks()
    tasks["pose"].make_tiny(root / "ckpt", seed=0)
    tasks["pose-causal"].check_folder(root / "ckpt")
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(root / "ref.png")
    poses = [write_pose_folder(root / f"poses{shift}", shift) for shift in (1, 6)]
    return root, poses


class FrameList:
    def __init__(self):
        self.frames = []

    def append_data(self, frame):
        self.frames.append(frame)


def run_job(pipeline, root, pose_folder):
    writer = FrameList()
    job = PromptJob(1, "a person is dancing", inputs={"ref_image": root / "ref.png", "pose_video": pose_folder})
    used = pipeline.run(job, SampleSettings(frame_num=5), 0, writer)  # 2 latent frames
    return np.stack(writer.frames).astype(np.float32), used


def test_pose_streaming_generation_end_to_end(tiny_pose):
    root, poses = tiny_pose
    args = Namespace(dtype=None, device="cpu", t5_cpu=False, dit_checkpoint=None, use_ema=False, vae_tiling=False)
    config = {"num_frame_per_block": 1, "denoising_step_list": [1000, 500]}
    pipeline = extension_tasks()["pose-causal"].load(root / "ckpt", args, config)
    pipeline.progress = False
    first, used = run_job(pipeline, root, poses[0])
    second, _ = run_job(pipeline, root, poses[1])
    assert first.shape == (5, 64, 64, 3) and used["num_frame_per_block"] == 1
    difference = np.abs(first - second).mean(axis=(1, 2, 3))
    assert (difference > 1.0).all(), difference  # the pose drives every frame (uint8 scale)


def test_pose_bidirectional_generation_end_to_end(tiny_pose, tmp_path):
    """inference.py with the `pose` task on the tiny folder: an mp4 and its sidecar."""
    root, poses = tiny_pose
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{root / 'ref.png'}\t{poses[0]}\ta person is dancing\n")
    out = tmp_path / "out"
    assert run_inference_main("--task", "pose", "--checkpoint_dir", root / "ckpt", "--data_path", prompts,
                              "--output_folder", out, "--sample_steps", 2, "--frame_num", 5, "--device", "cpu") == 0
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["frames"] == 5 and sidecar["guide_scale"] == [1.5, 1.5] and sidecar["sample_solver"] == "euler"
    assert next(out.glob("*.mp4")).stat().st_size > 0


# -- training ---------------------------------------------------------------------------------------

def pose_latent_set(folder, samples=8, seed=0):
    """Cached-latent files with pose videos: a bar at a per-sample height; the clip's latents are a
    fixed function of that height, so the pose tells the model what the clean video is."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 16, 2, 4, 4, generator=g)
    folder.mkdir()
    for i in range(samples):
        pose = torch.zeros(3, 5, 32, 32)
        top = 2 + 3 * i
        pose[2, :, top:top + 4, 8:24] = 1.0
        level = i / (samples - 1)
        save_state_dict({"latents": level * basis[0] + (1 - level) * basis[1], "pose_video": pose,
                         "context": torch.randn(4, 32, generator=g)}, folder / f"{i:03d}.safetensors",
                        metadata={"text": f"sample {i}"})
    return folder


def test_pose_trainer_learns_pose_proj_and_exports(tmp_path):
    from safetensors.torch import load_file

    from trainers.config import load_config
    from trainers.loop import train
    from trainers.pose import PoseConditionedWan

    dit = randomize(WanModel(**tiny_dit_config()), seed=4)
    save_state_dict(dit.state_dict(), tmp_path / "dit" / "model.safetensors")
    (tmp_path / "dit" / "config.json").write_text(json.dumps(tiny_dit_config()))
    data = pose_latent_set(tmp_path / "latents")
    cfg = load_config(REPO_ROOT / "configs" / "tests" / "tiny_t2v.yaml", [
        "trainer=pose", f"data.path={data}", f"model.checkpoint={tmp_path / 'dit'}", "model.preset=null",
        "model.frozen_dtype=fp32", "train.max_steps=12", "checkpoint.every=12", "train.ema_weight=null",
        "train.total_batch_size=2", "model.gradient_checkpointing=false", "optimizer.lr=3e-2",
        f"pose.pose_dim={POSE_DIM}", "pose.condition_dropout=0.0"])
    train(cfg, tmp_path / "run")
    final = tmp_path / "run" / "checkpoints" / "step_000012"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["pose.safetensors"]  # the DiT stayed frozen
    encoder = PoseEncoder(dim=dit.dim, pose_dim=POSE_DIM, ref_channels=0)
    load_unianimate(dit, encoder, [final / "pose.safetensors"])  # inference's loader takes the export

    # on fixed noise and timesteps, the trained pose condition explains the clips better than none
    model = PoseConditionedWan(dit.eval(), encoder.eval())
    batch = [load_file(str(p)) for p in sorted(data.glob("*.safetensors"))]
    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([b["latents"] for b in batch])
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(len(x0), generator=g) * 0.8 + 0.1
    xt = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * noise
    context = [b["context"] for b in batch]
    pose_video = torch.stack([b["pose_video"] for b in batch])
    with torch.no_grad():
        errors = [(model(xt, sigma * 1000, context, pose_video=pose_video, keep=torch.full((8,), keep))
                   - (noise - x0)).square().mean().item() for keep in (1.0, 0.0)]
    assert errors[0] < 0.9 * errors[1], errors


@pytest.mark.parametrize("name", ["pose_1.3B_proj.yaml", "pose_i2v_14B_lora.yaml"])
def test_pose_shipped_training_configs_validate(name, tmp_path):
    from trainers.config import ConfigError, load_config

    overrides = [f"data.path={tmp_path}", "model.checkpoint=null", "pose.weights=[]"]
    cfg = load_config(REPO_ROOT / "configs" / name, overrides, world_size=8)
    assert cfg.trainer == "pose" and cfg.pose.train_cnn
    with pytest.raises(ConfigError, match="set causal.enabled false"):
        load_config(REPO_ROOT / "configs" / name, overrides + ["causal.enabled=true"], world_size=8)
