"""Inference task `s2v`: Wan2.2 S2V-14B, a talking video from `image<TAB>audio<TAB>prompt` lines.

Checkpoint folder (the official Wan2.2-S2V-14B layout): `config.json` + DiT weights (one file or
shards with an index), `Wan2.1_VAE.pth`, the umT5 `.pth` and its tokenizer folder, and
`wav2vec2-large-xlsr-53-english/` (a Hugging Face wav2vec2 folder). `scripts/make_tiny_checkpoint.py
--task s2v` writes a tiny random one, with a `wan_config.json` of its small sizes and step counts.
"""

import json
import logging
from pathlib import Path

import torch

from wan.audio import Wav2Vec2Features
from wan.audio.tiny import make_tiny_wav2vec2
from wan.checkpoint import load_state_dict, read_state_dict
from wan.configs.preset import OFFICIAL_FILES
from wan.convert_vae import load_vae
from wan.model_loading import save_dit
from wan.modules.s2v import WanS2VModel, s2v_config
from wan.modules.t5 import T5Encoder
from wan.modules.text_encoder import T5TextEncoder
from wan.modules.vae2_1 import WanVAE21
from wan.utils.tiny_tokenizer import make_tiny_tokenizer

from ..loading import WAN_CONFIG, default_dtype, dit_weights, read_wan_config, require_files, requested_dtype
from ..s2v import S2V_DEFAULTS, S2VPipeline
from ..tiny_checkpoint import TINY_DIT, TINY_T5, TINY_VAE, TINY_VOCAB
from . import ExtensionTask, register

log = logging.getLogger(__name__)

VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_FOLDER = "wav2vec2-large-xlsr-53-english"
FILES = (VAE_FILE, OFFICIAL_FILES["t5_checkpoint"], OFFICIAL_FILES["t5_tokenizer"], WAV2VEC_FOLDER, "config.json")
TINY_OVERRIDES = dict(sizes=["64*64"], frame_num=12, sample_steps=2)


def check_folder(folder):
    require_files(folder, [folder / name for name in FILES], "Wan2.2-S2V-14B")
    dit_weights(folder)


def load(folder, args, config):
    device = torch.device(args.device)
    dtype = requested_dtype(args.dtype, device)
    extra = read_wan_config(folder)
    dit_config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        dit = WanS2VModel.from_config(dit_config)
    weights = dit_weights(folder)
    dit = load_state_dict(dit, read_state_dict(weights), dtype=dtype, source=str(weights)).eval().requires_grad_(False)
    log.info("loaded the S2V DiT (%.2fB parameters) from %s", sum(p.numel() for p in dit.parameters()) / 1e9, weights)
    vae = load_vae(folder / VAE_FILE, "2.1", torch.float32, device, **extra.get("vae", {}))
    t5_device = torch.device("cpu") if args.t5_cpu else device
    text_encoder = T5TextEncoder.from_checkpoint(
        folder / OFFICIAL_FILES["t5_checkpoint"], folder / OFFICIAL_FILES["t5_tokenizer"], text_len=dit.text_len,
        dtype=default_dtype(t5_device), device=t5_device, **extra.get("t5", {}))
    text_encoder.output_device = device
    # wav2vec2 runs in fp32 on the CPU, as upstream.
    audio_encoder = Wav2Vec2Features.from_folder(folder / WAV2VEC_FOLDER).all_hidden_states
    overrides = dict(extra.get("overrides", {}))
    sizes = overrides.pop("sizes", None)
    if sizes:  # a folder declaring its own sizes (tiny checkpoints) defaults to the first
        overrides.setdefault("size", sizes[0])
    return S2VPipeline(dit, vae, text_encoder, audio_encoder, defaults=overrides,
                       **({"sizes": sizes} if sizes else {}), device=device, vae_tiling=args.vae_tiling,
                       offload_model=args.offload_model)


def make_tiny(folder, seed=0):
    """A tiny random S2V folder: S2V DiT at the core's tiny widths, tiny Wan2.1 VAE and umT5, and a tiny
    wav2vec2-large layout with 24 layers (the DiT mixes exactly 25 hidden states)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dims = {k: v for k, v in TINY_DIT.items() if k not in ("clip_dim", "clip_tokens")}
    wav2vec = make_tiny_wav2vec2(folder / WAV2VEC_FOLDER, "large", seed=seed + 40, num_hidden_layers=24)
    audio_dim = json.loads((wav2vec / "config.json").read_text())["hidden_size"]
    config = s2v_config(**dims, audio_dim=audio_dim, audio_inject_layers=tuple(range(dims["num_layers"])))
    torch.manual_seed(seed)
    save_dit(folder, WanS2VModel.from_config(config).state_dict(), config, "WanModel_S2V")
    torch.manual_seed(seed + 10)
    torch.save(WanVAE21(**TINY_VAE["wan2.1"]).state_dict(), folder / VAE_FILE)
    torch.manual_seed(seed + 20)
    torch.save(T5Encoder(**TINY_T5).state_dict(), folder / OFFICIAL_FILES["t5_checkpoint"])
    make_tiny_tokenizer(folder / OFFICIAL_FILES["t5_tokenizer"], vocab_size=TINY_VOCAB)
    (folder / WAN_CONFIG).write_text(json.dumps({"overrides": TINY_OVERRIDES, "vae": TINY_VAE["wan2.1"],
                                                 "t5": TINY_T5}, indent=2))
    return folder


register(ExtensionTask(
    name="s2v", description="Wan2.2 S2V-14B: talking video from a reference image and speech (any length)",
    fields=("image", "audio"), file_kinds={"image": "image", "audio": "audio"}, check_folder=check_folder,
    load=load, make_tiny=make_tiny, defaults=dict(S2V_DEFAULTS), fps=16))
