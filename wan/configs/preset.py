"""The preset record: architecture, files and sampling defaults of one official Wan model."""

from dataclasses import dataclass, field, replace

# The official default negative prompt (Wan2.1 / Wan2.2 shared config).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                   "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

OFFICIAL_FILES = {
    "t5_checkpoint": "models_t5_umt5-xxl-enc-bf16.pth",
    "t5_tokenizer": "google/umt5-xxl",
    "clip_checkpoint": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "clip_tokenizer": "xlm-roberta-large",
    "low_noise_checkpoint": "low_noise_model",
    "high_noise_checkpoint": "high_noise_model",
}


@dataclass(frozen=True)
class WanPreset:
    name: str                  # official task key, e.g. "t2v-1.3B"
    release: str               # "wan2.1" | "wan2.2"
    task: str                  # "t2v" | "i2v" | "flf2v" | "ti2v"
    dit: dict                  # WanModel constructor arguments
    manifest: str              # checkpoint key manifest of one DiT (expert) in the reference data
    sizes: tuple               # supported "H*W" sizes, as the official SUPPORTED_SIZES
    vae: str = "wan2.1"
    use_clip: bool = False
    moe_boundary: float = None  # A14B: high-noise expert for t >= boundary * num_train_timesteps
    text_len: int = 512
    num_train_timesteps: int = 1000
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_solver: str = "unipc"
    guide_scale: object = 5.0  # float, or (low_noise, high_noise) for A14B
    frame_num: int = 81
    fps: int = 16
    negative_prompt: str = NEGATIVE_PROMPT
    files: dict = field(default_factory=lambda: dict(OFFICIAL_FILES))

    @property
    def vae_stride(self):
        return (4, 16, 16) if self.vae == "wan2.2" else (4, 8, 8)

    @property
    def vae_checkpoint(self):
        return "Wan2.2_VAE.pth" if self.vae == "wan2.2" else "Wan2.1_VAE.pth"

    @property
    def patch_size(self):
        return tuple(self.dit.get("patch_size", (1, 2, 2)))

    @property
    def is_moe(self):
        return self.moe_boundary is not None

    def with_overrides(self, **changes):
        """A copy with some fields changed (e.g. the tiny checkpoints declare their own sizes)."""
        return replace(self, **changes)
