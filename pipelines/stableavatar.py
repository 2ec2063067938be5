"""StableAvatar long-video generation: a portrait, a speech track and a prompt -> a talking video of the
audio's length (25 fps).

The latent video is denoised in windows of one clip (81 frames = 21 latent frames) that overlap by
`overlap` latent frames. At every step each window takes its slice of the whole-video latents, is
guided with three DiT rows (negative text without audio, negative text with audio, text with audio:
u + s_a (a - u) + s_t (c - a)), takes one Euler step, and from the second step on blends its first
overlap frames with the previous window's result of this step (linear or log weights). Every window
gets the reference image's condition `y` (first frame known) and CLIP tokens; its audio slice goes
through wav2vec2 (normalised over the slice) and the DiT's vocal projector.

Fixed against the released pipeline (Francis-Rings/StableAvatar, wan_inference_long_pipeline.py):
- audio of exactly one clip hung there (the window never advanced); shorter audio ran no window and
  returned all-zero latents. Here a video shorter than a clip is one window of its own length.
- the shorter last window was zero-padded to a whole clip in token space (the padding took part in
  attention and in the per-frame audio grouping, and its audio was stretched over a whole clip). Here
  the last window is moved back to end at the last latent frame, so every window is a whole clip and
  sees its true audio; its larger overlap is blended the same way. `reference_windows=True` restores
  the released behaviour (for parity checks).
- the video has exactly floor(samples / 640) frames (the audio's length at 25 fps) instead of
  rounding down to 4n + 1, and the input audio is muxed into the mp4.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from wan.samplers.schedule import FlowSchedule, shift_sigma

from .conditioning import image_to_video_condition
from .validation import InvalidInput
from .video_io import resize_cover

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
TEMPORAL_STRIDE = 4


@dataclass
class AvatarSettings:
    """One generation's settings (defaults: the released inference.sh)."""
    size: str = "512*512"            # "W*H"
    clip_frames: int = 81            # video frames per window (4n + 1)
    overlap: int = 5                 # latent frames shared by consecutive windows (>= 2)
    overlap_weights: str = "uniform"  # "uniform" (linear) or "log"
    sample_steps: int = 50
    sample_shift: float = 5.0
    text_guide_scale: float = 3.0
    audio_guide_scale: float = 5.0
    seed: int = 42

    def check(self):
        if self.clip_frames < 5 or (self.clip_frames - 1) % TEMPORAL_STRIDE:
            raise InvalidInput(f"clip_frames must be 4n+1 and at least 5, got {self.clip_frames}")
        latent = (self.clip_frames - 1) // TEMPORAL_STRIDE + 1
        if not 2 <= self.overlap < latent:
            raise InvalidInput(f"overlap must be between 2 and {latent - 1} latent frames for {self.clip_frames}-frame "
                               f"clips, got {self.overlap}")
        if self.overlap_weights not in ("uniform", "log"):
            raise InvalidInput(f"overlap_weights must be 'uniform' or 'log', got '{self.overlap_weights}'")
        if self.sample_steps < 1:
            raise InvalidInput(f"sample_steps must be at least 1, got {self.sample_steps}")
        return self


def flow_euler_schedule(num_steps, shift, num_train_timesteps=1000):
    """The schedule of diffusers' FlowMatchEulerDiscreteScheduler (static shift) that the released
    pipeline samples with: timesteps spaced linearly from 1000 to the shifted training schedule's
    smallest timestep, then shifted again; sigmas end at 0."""
    sigma_min = shift_sigma(1.0 / num_train_timesteps, shift)
    sigmas = shift_sigma(np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
                         / num_train_timesteps, shift)
    sigmas = torch.from_numpy(sigmas).float()
    return FlowSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]), sigmas * num_train_timesteps, num_train_timesteps)


def overlap_weights(length, scheme):
    """[length] weights of the new window's first frames (1 - w for the previous window's)."""
    ramp = torch.linspace(0, 1, length)
    return ramp if scheme == "uniform" else torch.log1p(ramp * (math.e - 1))


def latent_frames_for(num_samples):
    """(video frames, latent frames) of a 25 fps video as long as `num_samples` of 16 kHz audio."""
    frames = num_samples // SAMPLES_PER_FRAME
    if frames < 1:
        raise InvalidInput(f"the audio is {num_samples / SAMPLE_RATE * 1000:.0f} ms long; at least one 25 fps frame "
                           f"(40 ms) is needed")
    return frames, math.ceil((frames - 1) / TEMPORAL_STRIDE) + 1


def plan_windows(num_latents, window, overlap, reference=False):
    """[(start, end)] latent-frame windows covering [0, num_latents).

    Windows of `window` frames advance by window - overlap. The last one is moved back to end at
    num_latents (its overlap grows); a video shorter than one window is one window. `reference`
    gives the released pipeline's plan instead: a shorter last window [start, num_latents)."""
    if num_latents <= window:
        return [(0, num_latents)]
    windows, start = [], 0
    while start + window < num_latents:
        windows.append((start, start + window))
        start += window - overlap
    windows.append((start, num_latents) if reference else (num_latents - window, num_latents))
    return windows


class StableAvatarPipeline:
    """components: `dit` (StableAvatarModel), `vae`, `text_encoder`, `clip` (CLIPImageEncoder),
    `wav2vec` (`wan.audio.Wav2Vec2Features`)."""

    def __init__(self, dit, vae, text_encoder, clip, wav2vec, negative_prompt, device="cpu"):
        self.dit, self.vae, self.text_encoder, self.clip, self.wav2vec = dit, vae, text_encoder, clip, wav2vec
        self.negative_prompt = negative_prompt
        self.device = torch.device(device)

    def audio_features(self, waveform, start, end, num_latents, reference=False):
        """wav2vec2 last hidden state [1, T, C] of the audio of latent frames [start, end): 4 video
        frames of audio per latent frame, zero-padded past the end of the track (`reference`: the
        released slicing, whose last window takes the rest of the track)."""
        first = start * TEMPORAL_STRIDE * SAMPLES_PER_FRAME
        last = (len(waveform) if reference and end == num_latents
                else first + (end - start) * TEMPORAL_STRIDE * SAMPLES_PER_FRAME)
        audio = waveform[first:min(last, len(waveform))]
        audio = torch.cat([audio, audio.new_zeros(last - first - len(audio))])
        return self.wav2vec.last_hidden_state(audio).to(self.device)

    def guided_prediction(self, x, t, contexts, y, clip_fea, audio, settings, num_frames=None, seq_len=None):
        """The three guidance rows in one DiT batch -> u + s_a (a - u) + s_t (c - a), x [1, 16, F, h, w]."""
        rows = 3
        pred = self.dit(x.expand(rows, *x.shape[1:]), t.reshape(1).expand(rows).to(self.device), contexts,
                        y=y.expand(rows, *y.shape[1:]), clip_fea=clip_fea.expand(rows, *clip_fea.shape[1:]),
                        audio=audio.expand(rows, *audio.shape[1:]), audio_mask=torch.tensor([False, True, True]),
                        num_frames=num_frames, seq_len=seq_len)
        uncond, audio_only, cond = pred.float().chunk(rows)
        return (uncond + settings.audio_guide_scale * (audio_only - uncond)
                + settings.text_guide_scale * (cond - audio_only))

    @torch.no_grad()
    def denoise(self, noise, waveform, context, context_null, y, clip_fea, settings, reference_windows=False,
                progress=True):
        """The long-video loop. noise [1, 16, T, h, w] (the whole video's initial latents); waveform [N]
        16 kHz; context / context_null [L, text_dim] prompt embeddings; y [1, 20, F_clip, h, w] the
        condition of one clip; clip_fea [1, 257, clip_dim]. Returns the latents [1, 16, T, h, w]."""
        window = (settings.clip_frames - 1) // TEMPORAL_STRIDE + 1
        num_latents = noise.shape[2]
        windows = plan_windows(num_latents, window, settings.overlap, reference_windows)
        schedule = flow_euler_schedule(settings.sample_steps, settings.sample_shift)
        contexts = [context_null, context_null, context]
        seq_len = window * math.prod(s // p for s, p in zip(noise.shape[3:], self.dit.patch_size[1:]))
        # wav2vec2 is deterministic: the features of each window are the same at every step.
        features = [self.audio_features(waveform, s, e, num_latents, reference_windows) for s, e in windows]
        latents = noise.float().to(self.device)
        bar = tqdm(total=len(schedule) * len(windows), desc="windows x steps", disable=not progress, leave=False)
        for i, t in enumerate(schedule.timesteps):
            step = torch.zeros_like(latents)
            previous_end = None
            for (start, end), audio in zip(windows, features):
                x = latents[:, :, start:end]
                padded = reference_windows and end - start < window
                pred = self.guided_prediction(x, t, contexts, y[:, :, :end - start], clip_fea, audio, settings,
                                              num_frames=settings.clip_frames if reference_windows else None,
                                              seq_len=seq_len if padded else None)
                x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]).item() * pred
                if start > 0 and i > 0:
                    shared = previous_end - start
                    w = overlap_weights(shared, settings.overlap_weights).to(x)[:, None, None]
                    x[:, :, :shared] = w * x[:, :, :shared] + (1 - w) * step[:, :, start:previous_end]
                step[:, :, start:end] = x
                previous_end = end
                bar.update()
            latents = step
        bar.close()
        return latents

    @torch.no_grad()
    def generate(self, image, waveform, prompt, settings=None, progress=True):
        """image [3, H, W] in [-1, 1], waveform [N] 16 kHz mono -> video [3, floor(N / 640), H', W'] in
        [-1, 1] at 25 fps, H' x W' = settings.size."""
        settings = (settings or AvatarSettings()).check()
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt is empty; describe the video (e.g. 'A woman is talking')")
        width, height = (int(v) for v in settings.size.split("*"))
        stride = self.vae.spatial_stride * self.dit.patch_size[1]
        if width % stride or height % stride:
            raise InvalidInput(f"size {settings.size}: width and height must be multiples of {stride}")
        frames, num_latents = latent_frames_for(len(waveform))
        lat_h, lat_w = height // self.vae.spatial_stride, width // self.vae.spatial_stride
        log.info("%.2f s of audio -> %d frames (%d latent frames) at %dx%d", len(waveform) / SAMPLE_RATE, frames,
                 num_latents, width, height)

        context, context_null = self.text_encoder.encode([prompt, self.negative_prompt], device=self.device)
        image = resize_cover(image.float(), width, height)
        y = image_to_video_condition(self.vae, [image], settings.clip_frames, lat_h, lat_w)[None].to(self.device)
        clip_fea = self.clip.encode([image[:, None]]).to(self.device)
        generator = torch.Generator().manual_seed(settings.seed)  # CPU noise: the same video on every device
        noise = torch.randn(1, self.vae.z_dim, num_latents, lat_h, lat_w, generator=generator)
        latents = self.denoise(noise, waveform, context, context_null, y, clip_fea, settings, progress=progress)
        video = self.vae.decode(latents.to(self.vae.conv2.weight.device))[0]
        return video[:, :frames].cpu()
