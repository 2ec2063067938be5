"""Wan2.2 S2V-14B: a talking video of any length from a reference image, speech and a prompt.

The video is made clip by clip (80 frames at 16 fps by default, 20 latent frames). Each clip sees the
reference image latent, its window of wav2vec2 features, and the last 73 generated pixel frames (the
motion buffer, re-encoded by the VAE after every clip and packed into FramePack tokens); the first
clip has no motion tokens. As upstream, the first clip is decoded behind the reference latent and its
first 3 frames are dropped, later clips are decoded behind the motion latents. Classifier-free
guidance: negative prompt and zeroed audio, same reference, motion and pose.

Timing: video frame k shows audio frame k. Upstream feeds clip r the audio frames [80r, 80r + 80)
and then drops the first 3 frames of the video, so its video runs 3 frames (0.19 s) ahead of the
muxed audio; here the audio (and pose) windows start 3 frames earlier instead (zero features,
copies of the first pose frame before the start). The video is cut to the audio's length: floor(seconds * fps) frames.
"""

import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from wan.modules.s2v import MOTION_FRAMES

from .guided_sampling import denoise
from .s2v_features import features_per_frame, to_feature_rate
from .validation import InvalidInput, check_image_file, check_positive, parse_size
from .video_io import image_to_tensor, resize_cover, write_frames

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FIRST_CLIP_DROP = 3  # frames dropped from the start of the first clip (decoded behind the reference)
SIZE_MULTIPLE = 64
S2V_NEGATIVE_PROMPT = ("画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
                       "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
                       "背景人很多，倒着走")
# Official S2V-14B defaults (wan/configs/wan_s2v_14B.py, generate.py). Sizes are maximum areas (W*H);
# the video takes the reference image's aspect ratio.
S2V_DEFAULTS = dict(size="1280*720", frame_num=80, sample_steps=40, sample_shift=3.0, sample_solver="unipc",
                    guide_scale=4.5, negative_prompt=S2V_NEGATIVE_PROMPT)
S2V_SIZES = ("720*1280", "1280*720", "480*832", "832*480", "1024*704", "704*1024", "704*1280", "1280*704")


def video_size(height, width, max_area, multiple=SIZE_MULTIPLE):
    """(H, W) of the video for a reference image: the image's aspect ratio, never upscaled, each side
    rounded up to a multiple of 64, the largest such size (on a 1% scale grid) whose area <= max_area."""
    largest = min(1.0, math.sqrt(max_area / (height * width)))
    for step in range(100):
        scale = largest * (1 - step / 100)
        h, w = (math.ceil(int(side * scale) / multiple) * multiple for side in (height, width))
        if h * w <= max_area:
            return h, w
    raise InvalidInput(f"no video size of at most {max_area} pixels in multiples of {multiple} fits a "
                       f"{width}x{height} image; use a larger size")


def clip_plan(num_frames, frames_per_clip):
    """Number of clips that cover `num_frames` video frames (the first clip gives 3 frames fewer)."""
    return math.ceil((num_frames + FIRST_CLIP_DROP) / frames_per_clip)


@dataclass
class S2VSettings:
    size: str
    frame_num: int          # frames per clip, a multiple of 4
    sample_steps: int
    sample_shift: float
    sample_solver: str
    guide_scale: float
    negative_prompt: str
    seed: int = 0


class S2VPipeline:
    """dit: `WanS2VModel`; vae: Wan2.1 VAE; text_encoder: `T5TextEncoder`; audio_encoder: waveform [N] at
    16 kHz -> the 25 stacked wav2vec2 hidden states [25, T, 1024] at 50 Hz. sizes: allowed max areas.
    offload_model: the DiT leaves the device while the VAE decodes and re-encodes between clips."""

    def __init__(self, dit, vae, text_encoder, audio_encoder, defaults=None, sizes=S2V_SIZES, fps=16,
                 device="cpu", vae_tiling=False, offload_model=False):
        self.dit, self.vae, self.text_encoder, self.audio_encoder = dit, vae, text_encoder, audio_encoder
        self.defaults = {**S2V_DEFAULTS, **(defaults or {})}
        self.sizes = tuple(sizes)
        self.fps = fps
        self.device = torch.device(device)
        self.vae_tiling = vae_tiling
        self.offload_model = offload_model

    @property
    def dits(self):
        return [self.dit]

    def settings(self, **given):
        """S2VSettings from the given values (None = default), checked."""
        values = {k: given.get(k) if given.get(k) is not None else v for k, v in self.defaults.items()}
        settings = S2VSettings(**values, seed=given.get("seed") or 0)
        if settings.size not in self.sizes:
            raise InvalidInput(f"size {settings.size} is not supported by S2V; supported maximum areas (W*H): "
                               f"{', '.join(self.sizes)}")
        if settings.frame_num < 4 or settings.frame_num % 4:
            raise InvalidInput(f"S2V frames per clip (frame_num) must be a multiple of 4, got {settings.frame_num}; "
                               f"use {max(4, settings.frame_num // 4 * 4)}")
        check_positive("sample_steps", settings.sample_steps)
        if not isinstance(settings.guide_scale, (int, float)):
            raise InvalidInput(f"S2V takes one guidance scale, got {settings.guide_scale}")
        return settings

    def audio_features(self, waveform, num_clips, frames_per_clip):
        """Per-frame audio features of all clips [1, 25, C, num_clips * frames_per_clip], the first 3 zero."""
        hidden = self.audio_encoder(waveform)
        frames = features_per_frame(to_feature_rate(hidden), num_clips * frames_per_clip - FIRST_CLIP_DROP, self.fps)
        return torch.cat([frames.new_zeros(*frames.shape[:2], FIRST_CLIP_DROP), frames], dim=-1)[None]

    def _encode(self, video):
        """[3, T, H, W] pixels -> [1, 16, (T-1)/4 + 1, h, w] latents on the DiT's device."""
        vae = self.vae
        latents = vae.encode(video[None].to(vae.conv2.weight.device), tiled=self.vae_tiling)
        return latents.to(self.device)

    def _decode(self, latents):
        vae = self.vae
        return vae.decode(latents.to(vae.conv2.weight.device), tiled=self.vae_tiling)[0].cpu()

    def _pose_latents(self, pose, clip, frames_per_clip, height, width):
        """Latents of the clip's pose frames ([3, T, H, W] in [-1, 1]; frames past the pose video are -1):
        as upstream, the chunk's first frame is prepended before encoding and its latent dropped. Clip
        windows are shifted as the audio's, the first pose frame repeated before the video starts."""
        pose = torch.cat([pose[:, :1].expand(-1, FIRST_CLIP_DROP, -1, -1), pose], dim=1)
        chunk = -torch.ones(3, frames_per_clip, height, width)
        frames = pose[:, clip * frames_per_clip:(clip + 1) * frames_per_clip]
        if frames.shape[1]:
            chunk[:, :frames.shape[1]] = torch.stack([resize_cover(f, width, height) for f in frames.unbind(1)], 1)
        return self._encode(torch.cat([chunk[:, :1], chunk], dim=1))[:, :, 1:]

    @torch.no_grad()
    def generate(self, prompt, image, waveform, settings=None, pose=None, progress=True):
        """image: [3, H, W] in [-1, 1]; waveform: [N] mono at 16 kHz; pose: optional [3, T, H, W] pose
        video in [-1, 1] at the output frame rate. Yields the video clip by clip, [3, frames, H, W] in
        [-1, 1] on the CPU; together floor(N / 16000 * fps) frames."""
        settings = settings or self.settings()
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt is empty; describe the video")
        if waveform.ndim != 1:
            raise InvalidInput(f"audio must be a mono waveform [N], got shape {tuple(waveform.shape)}")
        # Whole frames only: the video never outlasts the audio (the muxer cuts to the shorter stream).
        num_frames = int(waveform.numel() * self.fps // SAMPLE_RATE)
        if num_frames < 1:
            raise InvalidInput(f"the audio lasts {1000 * waveform.numel() / SAMPLE_RATE:.1f} ms, less than one "
                               f"video frame ({1000 / self.fps:.1f} ms at {self.fps} fps); give a longer audio")
        per_clip = settings.frame_num
        num_clips = clip_plan(num_frames, per_clip)
        max_width, max_height = parse_size(settings.size)
        height, width = video_size(image.shape[1], image.shape[2], max_width * max_height)
        log.info("S2V: %d frames (%.2f s of audio) at %dx%d in %d clip(s) of %d frames", num_frames,
                 waveform.numel() / SAMPLE_RATE, width, height, num_clips, per_clip)

        audio = self.audio_features(waveform, num_clips, per_clip).to(self.device)
        context, context_null = self.text_encoder.encode([prompt, settings.negative_prompt], device=self.device)
        reference = resize_cover(image.float(), width, height)
        ref_latents = self._encode(reference[:, None])
        # The motion buffer starts as zeros; the first clip leaves its tokens out, so it is encoded only
        # once it holds generated frames.
        motion_pixels, motion_latents = torch.zeros(3, MOTION_FRAMES, height, width), None
        lat_shape = (self.vae.z_dim, per_clip // self.vae.temporal_stride, height // self.vae.spatial_stride,
                     width // self.vae.spatial_stride)
        remaining = num_frames
        for clip in tqdm(range(num_clips), desc="clips", disable=not progress):
            first = clip == 0
            self.dit.to(self.device)
            generator = torch.Generator().manual_seed(settings.seed + clip)  # CPU noise: same on every device
            latents = torch.randn(lat_shape, generator=generator)[None].to(self.device)
            window = audio[..., clip * per_clip:(clip + 1) * per_clip]
            cond = None if pose is None else self._pose_latents(pose, clip, per_clip, height, width)
            shared = dict(ref_latents=ref_latents, motion_latents=motion_latents, cond=cond, drop_motion=first)

            def predict(latents, t):
                # Conditional and unconditional passes one after the other (batch 1): the per-token
                # modulation of 14B at 720p takes ~10 GB per pass.
                cond = self.dit(latents, t, [context], audio=window, **shared)
                if settings.guide_scale <= 1:  # as upstream, no unconditional pass then
                    return cond, None
                return cond, self.dit(latents, t, [context_null], audio=0 * window, **shared)

            latents = denoise(predict, latents, settings, generator=generator, progress=progress,
                              desc=f"clip {clip + 1}/{num_clips}")
            if self.offload_model:
                self.dit.to("cpu")
            prefix = ref_latents if first else motion_latents
            video = self._decode(torch.cat([prefix, latents], dim=2))[:, -per_clip:]
            if first:
                video = video[:, FIRST_CLIP_DROP:]
            yield video[:, :remaining]
            remaining -= video.shape[1]
            if remaining <= 0:
                break
            keep = min(MOTION_FRAMES, video.shape[1])
            motion_pixels = torch.cat([motion_pixels[:, keep:], video[:, -keep:]], dim=1)
            motion_latents = self._encode(motion_pixels)

    def run(self, job, settings, seed, writer):
        """One prompt-file job (`inputs` image and audio) -> frames appended to `writer`; returns the
        settings used, with the audio file as `audio_track` (muxed into the mp4 by inference.py)."""
        from wan.audio import load_audio

        used = self.settings(**{**vars(settings), "seed": seed})
        image = image_to_tensor(check_image_file(job.inputs["image"]))
        waveform = load_audio(job.inputs["audio"], SAMPLE_RATE)
        frames, height, width = 0, None, None
        for clip in self.generate(job.prompt, image, waveform, used):
            count, height, width = write_frames(writer, clip)
            frames += count
        return {**vars(used), "frames": frames, "height": height, "width": width, "fps": self.fps,
                "frames_per_clip": used.frame_num, "audio_track": str(job.inputs["audio"])}
