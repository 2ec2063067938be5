"""cfg_skip_ratio (VideoX-Fun): the last fraction of the denoising steps runs only the conditional
branch, used for both halves of classifier-free guidance (so guidance has no effect there), saving
about half of those steps' DiT work. The step index is the sampling loop's, the same for both
experts of a Wan2.2 MoE (VideoX-Fun's high-noise expert never updated its copy and never skipped)."""


def cfg_skipped(step, num_steps, ratio):
    """True when 0-based step `step` of `num_steps` runs only the conditional branch:
    step >= num_steps * (1 - ratio). ratio 0 never skips."""
    if not 0 <= ratio < 1:
        raise ValueError(f"cfg_skip_ratio must be in [0, 1), got {ratio}")
    return ratio > 0 and step >= num_steps * (1 - ratio)
