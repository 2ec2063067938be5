"""Camera trajectories for the Control-Camera models: pose files -> Plücker ray embeddings -> the
24-channel `y_camera` input of `CameraAdapter`.

A pose file (CameraCtrl / RealEstate10K format, as VideoX-Fun's `asset/*.txt`) has one header line,
then one line per frame: `frame fx fy cx cy 0 0 w2c[3x4 row-major]`, intrinsics normalized by the
image size. Poses are taken as shot at 1280x720: for another aspect ratio the focal length along
the cropped axis is rescaled. Rays go through pixel centers, in the world frame of the first camera
(c2w relative to frame 0); the Plücker coordinates of a ray with origin o and unit direction d are
(o x d, d).
"""

from pathlib import Path

import torch

POSE_FIELDS = 19


def read_pose_file(path):
    """Pose rows [F, 19] float64 of a pose file (the header line skipped)."""
    lines = Path(path).read_text().splitlines()[1:]
    rows = [[float(v) for v in line.split()] for line in lines if line.strip()]
    bad = [i + 2 for i, row in enumerate(rows) if len(row) != POSE_FIELDS]
    if not rows or bad:
        raise ValueError(f"{path}: expected a header line, then lines of {POSE_FIELDS} numbers "
                         f"(frame fx fy cx cy 0 0 + a 3x4 world-to-camera matrix); "
                         + (f"line(s) {bad[:5]} have another count" if bad else "found no pose lines"))
    return torch.tensor(rows, dtype=torch.float64)


def plucker_embedding(poses, width, height, original_pose_width=1280, original_pose_height=720):
    """Pose rows [F, 19] -> Plücker rays [F, height, width, 6] float32 (o x d, d) per pixel."""
    poses = torch.as_tensor(poses, dtype=torch.float64)
    fx, fy, cx, cy = poses[:, 1:5].unbind(1)
    pose_aspect, sample_aspect = original_pose_width / original_pose_height, width / height
    if pose_aspect > sample_aspect:  # the sample crops the poses' width: the focal length widens
        fx = height * pose_aspect * fx / width
    else:
        fy = width / pose_aspect * fy / height
    fx, fy, cx, cy = (v[:, None] for v in (fx * width, fy * height, cx * width, cy * height))

    w2c = torch.eye(4, dtype=torch.float64).repeat(len(poses), 1, 1)
    w2c[:, :3] = poses[:, 7:].reshape(-1, 3, 4)
    c2w = w2c[0] @ torch.linalg.inv(w2c)  # camera -> first camera's frame
    c2w[0] = torch.eye(4, dtype=torch.float64)

    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                                torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    directions = torch.stack([(cols.flatten() - cx) / fx, (rows.flatten() - cy) / fy,
                              torch.ones_like(cx).expand(-1, height * width)], dim=-1)  # [F, HW, 3]
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays_d = directions @ c2w[:, :3, :3].transpose(1, 2)
    rays_o = c2w[:, None, :3, 3].expand_as(rays_d)
    plucker = torch.cat([torch.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1)
    return plucker.reshape(len(poses), height, width, 6).float()


def camera_condition(plucker, temporal_stride=4):
    """Plücker rays [F_pix, H, W, 6] (F_pix = 4k + 1) -> `y_camera` [24, F_lat, H, W]: pixel frame 0
    repeated 4 times, then 4 pixel frames per latent frame, channel = ray channel * 4 + frame in group."""
    frames = plucker.shape[0]
    if (frames - 1) % temporal_stride:
        raise ValueError(f"camera trajectory has {frames} frames; need 4k + 1 (one per video frame)")
    video = plucker.permute(3, 0, 1, 2)  # [6, F, H, W]
    video = torch.cat([video[:, :1].repeat_interleave(temporal_stride, dim=1), video[:, 1:]], dim=1)
    c, f, h, w = video.shape
    grouped = video.reshape(c, f // temporal_stride, temporal_stride, h, w).transpose(1, 2)  # [6, 4, F_lat, H, W]
    return grouped.reshape(c * temporal_stride, f // temporal_stride, h, w)


def pose_file_condition(path, width, height, frame_num):
    """`y_camera` [24, F_lat, height, width] for a video of `frame_num` frames from a pose file: the
    first `frame_num` poses (the last pose repeats when the file is shorter)."""
    poses = read_pose_file(path)
    if len(poses) < frame_num:
        poses = torch.cat([poses, poses[-1:].expand(frame_num - len(poses), -1)])
    return camera_condition(plucker_embedding(poses[:frame_num], width, height))
