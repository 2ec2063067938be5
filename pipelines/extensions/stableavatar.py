"""Task `avatar`: StableAvatar audio-driven talking videos of any length (Francis-Rings/StableAvatar,
Wan2.1-1.3B + audio adapter). Prompt lines: `image<TAB>audio<TAB>prompt`; the audio (wav, mp3, m4a,
or a video's sound track) sets the length; the mp4 (25 fps) carries the input audio.

Checkpoint folder (assemble it from the releases; nothing is downloaded):
    transformer3d-square.pt | transformer3d-rec-vec.pt | diffusion_pytorch_model.safetensors
                            the StableAvatar DiT (official Wan keys + the audio adapter)
    config.json             optional DiT config (default: the released 1.3B)
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth     from Wan2.1-Fun-1.3B-InP
    wav2vec2-base-960h/     facebook/wav2vec2-base-960h (Hugging Face layout)
    wan_config.json         tiny folders only: encoder widths and small defaults
YAML options (`--config_path`): audio_guide_scale, overlap, overlap_weights, clip_frames; `--guide_scale`
is the text guidance.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from wan.audio import Wav2Vec2Features, load_audio
from wan.audio.tiny import TINY_WAV2VEC2, make_tiny_wav2vec2
from wan.checkpoint import CheckpointError, load_state_dict, read_state_dict
from wan.configs.preset import NEGATIVE_PROMPT, OFFICIAL_FILES
from wan.convert_vae import VAE_CLASSES, load_vae
from wan.model_loading import save_dit
from wan.modules.clip import CLIPImageEncoder, VisionTransformer
from wan.modules.stableavatar import STABLEAVATAR_1_3B, StableAvatarModel
from wan.modules.t5 import T5Encoder
from wan.modules.text_encoder import T5TextEncoder
from wan.utils.tiny_tokenizer import make_tiny_tokenizer

from ..loading import WAN_CONFIG, default_dtype, read_wan_config, require_files, requested_dtype
from ..stableavatar import AvatarSettings, StableAvatarPipeline
from ..tiny_checkpoint import TINY_CLIP, TINY_DIT, TINY_T5, TINY_VAE, TINY_VOCAB
from ..validation import check_image_file
from ..video_io import image_to_tensor, write_frames
from . import ExtensionTask, register

log = logging.getLogger(__name__)

DIT_FILES = ("transformer3d-square.pt", "transformer3d-rec-vec.pt", "diffusion_pytorch_model.safetensors")
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_FOLDER = "wav2vec2-base-960h"
# Options of AvatarSettings beyond the SampleSettings fields (size, sample_steps, sample_shift, guide_scale).
OPTIONS = ("audio_guide_scale", "overlap", "overlap_weights", "clip_frames")
# A cheaper tiny VAE than the core's (one residual block per stage): tiny runs are VAE-bound.
TINY_AVATAR_VAE = dict(TINY_VAE["wan2.1"], num_res_blocks=1)
DEFAULTS = dict(size="512*512", sample_steps=50, sample_shift=5.0, guide_scale=3.0, audio_guide_scale=5.0, overlap=5,
                overlap_weights="uniform", clip_frames=81)


def dit_file(folder):
    for name in DIT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no StableAvatar DiT in {folder}: expected one of {', '.join(DIT_FILES)}")


def check_folder(folder):
    dit_file(folder)
    required = [VAE_FILE, OFFICIAL_FILES["t5_checkpoint"], OFFICIAL_FILES["t5_tokenizer"],
                OFFICIAL_FILES["clip_checkpoint"], f"{WAV2VEC_FOLDER}/config.json"]
    require_files(folder, [folder / name for name in required], "StableAvatar",
                  " (see pipelines/extensions/stableavatar.py for the layout)")


def load_dit(folder, dtype, device):
    path = dit_file(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else STABLEAVATAR_1_3B
    with torch.device("meta"):
        model = StableAvatarModel.from_config(config)
    load_state_dict(model, read_state_dict(path), dtype=dtype, source=str(path))
    log.info("loaded StableAvatar DiT (%.2fB parameters) from %s", sum(p.numel() for p in model.parameters()) / 1e9,
             path)
    return model.to(device).eval().requires_grad_(False)


class AvatarRunner:
    def __init__(self, pipeline, defaults):
        self.pipeline = pipeline
        self.dits = [pipeline.dit]
        self.defaults = defaults

    def settings(self, settings, seed):
        """AvatarSettings from the command line's SampleSettings over the YAML options and defaults."""
        given = {"size": settings.size, "sample_steps": settings.sample_steps, "sample_shift": settings.sample_shift,
                 "text_guide_scale": settings.guide_scale[0] if isinstance(settings.guide_scale, tuple)
                 else settings.guide_scale}
        values = {**self.defaults, "text_guide_scale": self.defaults["guide_scale"],
                  **{k: v for k, v in given.items() if v is not None}, "seed": seed}
        return AvatarSettings(**{k: v for k, v in values.items() if k in AvatarSettings.__dataclass_fields__}).check()

    def run(self, job, settings, seed, writer):
        avatar = self.settings(settings, seed)
        if settings.negative_prompt is not None:
            self.pipeline.negative_prompt = settings.negative_prompt
        image = image_to_tensor(check_image_file(job.inputs["image"]))
        waveform = load_audio(job.inputs["audio"])
        video = self.pipeline.generate(image, waveform, job.prompt, avatar)
        frames, height, width = write_frames(writer, video)
        return {"frames": frames, "height": height, "width": width, "audio_track": str(job.inputs["audio"]),
                "negative_prompt": self.pipeline.negative_prompt, **asdict(avatar)}


def load(folder, args, config):
    folder = Path(folder)
    check_folder(folder)
    extra = read_wan_config(folder)
    device = torch.device(getattr(args, "device", None) or "cpu")
    dtype = requested_dtype(getattr(args, "dtype", None), device)
    dit = load_dit(folder, dtype, device)
    text_len = dit.text_len
    text_encoder = T5TextEncoder.from_checkpoint(folder / OFFICIAL_FILES["t5_checkpoint"],
                                                 folder / OFFICIAL_FILES["t5_tokenizer"], text_len=text_len,
                                                 dtype=default_dtype(device),
                                                 device=device, **extra.get("t5", {}))
    clip = CLIPImageEncoder.from_checkpoint(folder / OFFICIAL_FILES["clip_checkpoint"], device=device,
                                            **extra.get("clip", {}))
    vae = load_vae(folder / VAE_FILE, "2.1", torch.float32, device, **extra.get("vae", {}))
    wav2vec = Wav2Vec2Features.from_folder(folder / WAV2VEC_FOLDER, device=device)
    pipeline = StableAvatarPipeline(dit, vae, text_encoder, clip, wav2vec, NEGATIVE_PROMPT, device)
    defaults = {**DEFAULTS, **extra.get("defaults", {}), **{k: v for k, v in config.items() if k in OPTIONS}}
    return AvatarRunner(pipeline, defaults)


def make_tiny(folder, seed=0):
    """A tiny random StableAvatar folder: tiny DiT with the audio branch (random, non-zero k/v_vocal so the
    audio matters), tiny wav2vec2, VAE, umT5 and CLIP; 32x32, 17-frame clips, 2 steps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**STABLEAVATAR_1_3B, **TINY_DIT, "dim": 64, "ffn_dim": 128, "num_heads": 4,
              "vocal_projector": {"audio_in_dim": TINY_WAV2VEC2["hidden_size"], "num_heads": 2}}
    torch.manual_seed(seed)
    dit = StableAvatarModel.from_config(config)
    with torch.no_grad():
        for block in dit.blocks:
            for layer in (block.cross_attn.k_vocal, block.cross_attn.v_vocal):
                layer.weight.normal_(std=0.2)
                layer.bias.normal_(std=0.2)
    save_dit(folder, dit.state_dict(), config, "StableAvatarModel", DIT_FILES[-1])
    torch.manual_seed(seed + 10)
    torch.save(VAE_CLASSES["2.1"](**TINY_AVATAR_VAE).state_dict(), folder / VAE_FILE)
    torch.manual_seed(seed + 20)
    torch.save(T5Encoder(**TINY_T5).state_dict(), folder / OFFICIAL_FILES["t5_checkpoint"])
    make_tiny_tokenizer(folder / OFFICIAL_FILES["t5_tokenizer"], vocab_size=TINY_VOCAB)
    torch.manual_seed(seed + 30)
    clip = VisionTransformer(**TINY_CLIP)
    torch.save({f"visual.{k}": v for k, v in clip.state_dict().items()}, folder / OFFICIAL_FILES["clip_checkpoint"])
    make_tiny_wav2vec2(folder / WAV2VEC_FOLDER, "base", seed=seed + 40)
    defaults = dict(size="32*32", clip_frames=17, overlap=2, sample_steps=2)
    (folder / WAN_CONFIG).write_text(json.dumps({"vae": TINY_AVATAR_VAE, "t5": TINY_T5, "clip": TINY_CLIP,
                                                 "defaults": defaults}, indent=2))
    return folder


register(ExtensionTask(
    name="avatar", description="StableAvatar: talking portrait video from an image and speech, any length (25 fps)",
    fields=("image", "audio"), file_kinds={"image": "image", "audio": "audio"}, check_folder=check_folder, load=load,
    make_tiny=make_tiny, defaults=DEFAULTS, fps=25))
