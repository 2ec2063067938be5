"""Pose-driven animation (UniAnimate-DiT): a reference image and a rendered pose video -> a video of
the reference moving as the poses do, with the bidirectional DiT (many steps, whole clip) or the
causal one (block by block over a KV cache, streamed).

Inputs are prepared as the reference does: every pose frame is resized to the video size (PIL
bilinear) and scaled to [0, 1]; the first `frame_num` frames are taken, a short video repeats its
last frame. The reference pose (`pose.jpg` in a pose folder, `<video stem>_pose.jpg|png` beside a pose
mp4; the first pose frame when there is none) enters `y` through `randomref_embedding_pose`; the
reference image gives `y`'s image latent and the CLIP tokens (Wan2.1 I2V). The pose video is
embedded once into `add_condition` tokens: the causal pipeline slices them per block.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .causal import pipeline_from_config
from .conditioning import image_to_video_condition
from .guided_sampling import denoise
from .validation import InvalidInput, check_image_file
from .video_io import frame_files, image_to_tensor, read_frames, write_frames

log = logging.getLogger(__name__)

REFERENCE_POSE = "pose.jpg"  # the reference pose in a pose folder, as run_align_pose.py writes it


def read_pose_frames(path, num_frames):
    """The first `num_frames` frames (fewer if the video is shorter) of a pose mp4 or image folder (its
    `pose.jpg` excluded), PIL RGB."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        return [check_image_file(p) for p in frame_files(path, "pose folder", exclude=(REFERENCE_POSE,))[:num_frames]]
    frames = [Image.fromarray(frame) for frame in read_frames(path, num_frames)]
    if not frames:
        raise InvalidInput(f"pose video {path} has no frames")
    return frames


def reference_pose_file(path):
    """The rendered pose of the reference image that comes with a pose video, or None."""
    path = Path(path)
    candidates = [path / REFERENCE_POSE] if path.is_dir() else \
        [path.with_name(f"{path.stem}_pose{suffix}") for suffix in (".jpg", ".png")]
    return next((p for p in candidates if p.is_file()), None)


def pose_image_tensor(image, height, width):
    """PIL image -> [3, height, width] in [0, 1], resized as the reference (PIL bilinear, aspect ignored)."""
    from PIL import Image

    array = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 255


def load_pose_inputs(path, frame_num, height, width):
    """A pose mp4 or folder -> (pose video [3, frame_num, H, W], reference pose [3, H, W]), in [0, 1]."""
    frames = read_pose_frames(path, frame_num)
    if len(frames) < frame_num:
        log.info("pose video %s has %d frames; repeating its last to %d", path, len(frames), frame_num)
        frames += [frames[-1]] * (frame_num - len(frames))
    video = torch.stack([pose_image_tensor(f, height, width) for f in frames], dim=1)
    ref_file = reference_pose_file(path)
    if ref_file is None:
        log.warning("no reference pose beside %s (%s); using its first frame", path,
                    REFERENCE_POSE if Path(path).is_dir() else "<video stem>_pose.jpg")
        return video, video[:, 0]
    return video, pose_image_tensor(check_image_file(ref_file), height, width)


def load_reference_image(path, height, width):
    """The reference image resized to the video size (bilinear, as the reference) -> [3, H, W] in [-1, 1]."""
    from PIL import Image

    return image_to_tensor(check_image_file(path).resize((width, height), Image.BILINEAR))


class PosePipeline:
    """Pose animation with loaded components (`pipelines.loading.WanComponents`) and a `PoseEncoder`.

    causal: None for the bidirectional pipeline, else a `CausalWanModel` over `components.dit` and
        its config (`pipelines.causal.pipeline_from_config` keys) for the streaming pipeline.
    """

    def __init__(self, components, encoder, device="cpu", causal=None, causal_config=None, vae_tiling=False,
                 progress=True):
        self.components = components
        self.encoder = encoder
        self.device = torch.device(device)
        self.causal = causal
        self.causal_config = causal_config or {}
        self.vae_tiling = vae_tiling
        self.progress = progress

    @property
    def dit(self):
        return self.components.dit

    @property
    def dits(self):
        return [self.dit]

    @torch.no_grad()
    def conditions(self, image, pose_video, ref_pose):
        """image [3, H, W] in [-1, 1], pose_video [3, F, H, W] and ref_pose [3, H, W] in [0, 1] -> the DiT's
        keyword inputs for the whole video (batch 1): add_condition (pose tokens), y with the reference
        pose's features (a DiT with condition channels), clip_fea (a DiT with the CLIP branch)."""
        dit, vae = self.dit, self.components.vae
        frames, height, width = pose_video.shape[1:]
        stride = vae.spatial_stride * dit.patch_size[1]
        if height % stride or width % stride:
            raise InvalidInput(f"video size {width}*{height} (W*H) must be a multiple of {stride} for the pose CNN")
        lat_h, lat_w = height // vae.spatial_stride, width // vae.spatial_stride
        inputs = {"add_condition": self.encoder.pose_tokens(pose_video[None].to(self.device))}
        if dit.in_dim != dit.out_dim:
            y = image_to_video_condition(vae, [image], frames, lat_h, lat_w)[None].to(self.device)
            inputs["y"] = self.encoder.condition_y(y, ref_pose[None].to(self.device))
        if dit.image_branch:
            clip = self.components.clip
            inputs["clip_fea"] = clip.encode([image[:, None].to(clip.device)]).to(self.device)
        return inputs

    def _context(self, prompt, negative_prompt, guide_scale):
        encoder = self.components.text_encoder
        if guide_scale == 1:
            return encoder.encode([prompt], device=self.device)[0], None
        return encoder.encode([prompt, negative_prompt], device=self.device)

    @torch.no_grad()
    def generate(self, prompt, image, pose_video, ref_pose, settings):
        """Bidirectional: the whole clip, pose tokens on the conditional branch only.
        settings: resolved `SampleSettings`. Returns the video [3, F, H, W] in [-1, 1] (CPU, float32)."""
        dit, vae = self.dit, self.components.vae
        inputs = self.conditions(image, pose_video, ref_pose)
        pose_tokens = inputs.pop("add_condition")
        context, negative = self._context(prompt, settings.negative_prompt, settings.guide_scale[0])
        frames = (pose_video.shape[1] - 1) // vae.temporal_stride + 1
        shape = (dit.out_dim, frames, *(s // vae.spatial_stride for s in pose_video.shape[2:]))
        generator = torch.Generator().manual_seed(settings.seed)  # CPU noise: the same on every device
        latent = torch.randn(shape, generator=generator).to(self.device)

        def predict(latent, t):
            cond = dit(latent[None], t, [context], add_condition=pose_tokens, **inputs)[0]
            return cond, None if negative is None else dit(latent[None], t, [negative], **inputs)[0]

        latent = denoise(predict, latent, settings, self.components.preset.num_train_timesteps, generator,
                         self.progress)
        return vae.decode(latent[None].to(vae.conv2.weight.device), tiled=self.vae_tiling)[0].cpu()

    @torch.no_grad()
    def stream(self, prompt, image, pose_video, ref_pose, settings):
        """Causal: yields pixel blocks [3, T_block, H, W] in [-1, 1] as they finish; each block takes its
        frames' slice of the pose tokens computed once for the whole video."""
        vae, guide = self.components.vae, settings.guide_scale[0]
        config = {"timestep_shift": settings.sample_shift, "sample_solver": settings.sample_solver,
                  "sample_steps": settings.sample_steps, "guidance_scale": guide, **self.causal_config}
        pipeline = pipeline_from_config(self.causal, config)
        inputs = self.conditions(image, pose_video, ref_pose)
        context, negative = self._context(prompt, settings.negative_prompt, pipeline.guide_scale)
        frames = (pose_video.shape[1] - 1) // vae.temporal_stride + 1
        latent_size = tuple(s // vae.spatial_stride for s in pose_video.shape[2:])
        prefix = None
        if "y" not in inputs:  # a T2V DiT: the image can only start the video, as a clean first block
            if not self.causal.independent_first_frame:
                log.warning("this DiT takes no image condition and the config has no independent_first_frame: "
                            "the reference image is not used")
            else:
                prefix = vae.encode(image[None, :, None].to(vae.conv2.weight.device)).to(self.device)
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        stream = pipeline.stream_video(vae, [context], frames, latent_size,
                                       negative_context=None if negative is None else [negative], prefix=prefix,
                                       generator=generator, tiled=self.vae_tiling, **inputs)
        for pixels in tqdm(stream, total=len(self.causal.block_sizes(frames)), desc="blocks", leave=False,
                           disable=not self.progress):
            yield pixels[0].cpu()

    def run(self, job, settings, seed, writer):
        """One prompt-file job (`ref_image`, `pose_video`) -> frames into `writer`; returns the settings used."""
        settings = settings.resolved(self.components.preset)
        settings.seed = seed
        width, height = (int(v) for v in settings.size.split("*"))
        image = load_reference_image(job.inputs["ref_image"], height, width)
        pose_video, ref_pose = load_pose_inputs(job.inputs["pose_video"], settings.frame_num, height, width)
        if self.causal is None:
            frames = write_frames(writer, self.generate(job.prompt, image, pose_video, ref_pose, settings))[0]
        else:
            frames = sum(write_frames(writer, block)[0]
                         for block in self.stream(job.prompt, image, pose_video, ref_pose, settings))
        used = {"frames": frames, "height": height, "width": width, **vars(settings)}
        if self.causal is not None:
            used.update(self.causal_config, num_frame_per_block=self.causal.num_frame_per_block,
                        independent_first_frame=self.causal.independent_first_frame,
                        local_attn_size=self.causal.local_attn_size, sink_size=self.causal.sink_size)
        return used
