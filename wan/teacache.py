"""TeaCache (Timestep Embedding Aware Cache) for the Wan DiT, with VideoX-Fun's rule and coefficients.

A denoising step may skip the transformer blocks and reuse the residual (blocks output - blocks input)
of the last step that ran them, added to this step's patch-embedded tokens; the head always runs.
Whether to skip is read from the timestep modulation e0 ([B, 6, C], `time_projection` output; the
last token's for per-token timesteps) of the conditional branch:

    rel = mean|e0 - e0_prev| / mean|e0_prev|;  acc += poly(rel);  skip while acc < threshold,
    else run the blocks and set acc = 0

where `poly` is a per-model rescaling polynomial fitted on output changes. The first
`skip_start_steps` steps always run. The unconditional branch follows the conditional branch's
decision with its own residual; when cond and uncond go through the model in one batch, the rows
are [cond, uncond] and a cond-only call (cfg skip) uses the cond rows of the cached residual.

    cache = TeaCache(teacache_coefficients("Wan2.1-Fun-V1.1-1.3B-InP"), num_steps=50, threshold=0.1)
    cache.attach(dit)                      # a WanModel, a variant, or a WanMoE (one cache for both experts)
    with cache.branch("uncond"): ...       # label a separate unconditional call (default "cond")

Differences from VideoX-Fun, where its behaviour is a defect: model names are matched without the
lookup holes (Wan2.1-Fun-V1.1-14B had no coefficients and TeaCache silently turned off; unknown
names raise); `skip_start_steps=0` works (the reference crashes: no previous e0 on step 0; the
first step always runs); a negative polynomial value (the 1.3B / 14B-t2v polynomials are negative
at very small and very large rel) adds 0, so acc never decreases and threshold 0 never skips.
Kept as the reference: after the conditional call of the last step the cache resets, so a separate
unconditional call there runs its blocks (the trace in `teacache_trace_*` depends on it).
"""

import contextlib
import functools

COEFFICIENTS = {
    "wan2.1-1.3b": [-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2],
    "wan2.1-t2v-14b": [-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1],
    "wan2.1-i2v-14b-480p": [2.57151496e5, -3.54229917e4, 1.40286849e3, -1.35890334e1, 1.32517977e-1],
    "wan2.1-i2v-14b-720p": [8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2],
}
# Model-name substrings (lower case) -> coefficient set; the first match wins.
MODEL_PATTERNS = [
    (("wan2.1-t2v-1.3b", "wan2.1-fun-1.3b", "wan2.1-fun-v1.1-1.3b", "wan2.1-vace-1.3b"), "wan2.1-1.3b"),
    (("wan2.1-t2v-14b",), "wan2.1-t2v-14b"),
    (("wan2.1-i2v-14b-480p",), "wan2.1-i2v-14b-480p"),
    (("wan2.1-i2v-14b-720p", "wan2.1-fun-14b", "wan2.1-fun-v1.1-14b", "wan2.2-fun", "wan2.2-i2v-a14b",
      "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.2-s2v", "wan2.1-vace-14b", "wan2.2-vace-fun"), "wan2.1-i2v-14b-720p"),
]


def teacache_coefficients(model_name):
    """The rescaling polynomial (highest power first) of a model, from its release name (e.g. the
    checkpoint folder name `Wan2.1-Fun-V1.1-14B-Control`); '_' and '-' are interchangeable."""
    name = str(model_name).lower().replace("_", "-")
    for patterns, key in MODEL_PATTERNS:
        if any(p in name for p in patterns):
            return COEFFICIENTS[key]
    known = ", ".join(p for patterns, _ in MODEL_PATTERNS for p in patterns)
    raise ValueError(f"no TeaCache coefficients for model '{model_name}'; the name must contain one of: {known} "
                     f"(or pass coefficients explicitly)")


def polynomial(coefficients, x):
    """numpy.poly1d(coefficients)(x) in float64: coefficients from the highest power down."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class TeaCache:
    def __init__(self, coefficients, num_steps, threshold=0.1, skip_start_steps=5):
        if num_steps < 1:
            raise ValueError(f"TeaCache num_steps must be >= 1, got {num_steps}")
        if threshold < 0:
            raise ValueError(f"TeaCache threshold must be >= 0 (0 never skips), got {threshold}")
        if not 0 <= skip_start_steps <= num_steps:
            raise ValueError(f"TeaCache skip_start_steps must be in [0, num_steps={num_steps}], got {skip_start_steps}")
        self.coefficients = [float(c) for c in coefficients]
        self.num_steps = num_steps
        self.threshold = threshold
        self.skip_start_steps = skip_start_steps
        self.trace = []  # one record per model call: step, branch, computed, rel, acc
        self._branch = "cond"
        self.reset()

    def reset(self, num_steps=None):
        """Forgets the trajectory (a new generation); optionally with a new step count."""
        if num_steps is not None:
            self.num_steps = num_steps
        self.step = 0
        self.accumulated = 0.0
        self.previous_e0 = None
        self.compute = True
        self.residuals = {}

    @contextlib.contextmanager
    def branch(self, name):
        """Labels the model calls inside as one CFG branch: "cond" (decides) or "uncond" (follows)."""
        if name not in ("cond", "uncond"):
            raise ValueError(f"TeaCache branch must be 'cond' or 'uncond', got '{name}'")
        previous, self._branch = self._branch, name
        try:
            yield self
        finally:
            self._branch = previous

    def attach(self, model):
        """Routes the blocks of every WanModel in `model` (one, or both experts of a WanMoE) through this
        cache, replacing any cache attached before; `detach` undoes it. Returns the model."""
        from wan.modules.model import WanModel

        for module in model.modules():
            if isinstance(module, WanModel):
                vars(module).pop("run_blocks", None)
                module.run_blocks = functools.partial(self._run_blocks, module.run_blocks)
        return model

    @staticmethod
    def detach(model):
        for module in model.modules():
            vars(module).pop("run_blocks", None)
        return model

    def _decide(self, e0):
        """Updates the accumulator with this step's e0 [B, L or 1, 6, C]; returns (compute, rel, acc)."""
        e0 = e0[:, -1].float()
        previous, self.previous_e0 = self.previous_e0, e0
        if self.step < self.skip_start_steps or previous is None:
            self.accumulated = 0.0
            return True, None, None
        rel = ((e0 - previous).abs().mean() / previous.abs().mean()).item()
        acc = self.accumulated + max(polynomial(self.coefficients, rel), 0.0)
        compute = acc >= self.threshold
        self.accumulated = 0.0 if compute else acc
        return compute, rel, acc

    def _run_blocks(self, run_blocks, x, e0, *args, **kwargs):
        branch = self._branch
        rel = acc = None
        if branch == "cond":
            self.compute, rel, acc = self._decide(e0)
        residual = self.residuals.get(branch)
        computed = self.compute or residual is None
        if computed:
            out = run_blocks(x, e0, *args, **kwargs)
            self.residuals[branch] = out - x
        else:
            out = x + residual[:x.shape[0]]
        self.trace.append(dict(step=self.step, branch=branch, computed=computed, rel=rel, acc=acc))
        if branch == "cond":
            self.step += 1
            if self.step == self.num_steps:
                self.reset()
        return out

