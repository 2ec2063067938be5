"""Golden runners of the VideoX-Fun family: `fun_transformer` (Fun InP / Control / Camera DiTs),
`camera_plucker` (pose file -> Plücker rays), `teacache_trace` (TeaCache + cfg skip in the
sampling loop) and `lora_merge` (kohya-format LoRA merge/unmerge)."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from wan.camera import plucker_embedding
from wan.checkpoint import load_state_dict
from wan.modules.fun import FunWanModel

golden_dir(EXT_DIR / "fun" / "golden", "fun_transformer", "camera_plucker", "teacache_trace", "lora_merge")

FUN_INPUTS = ("y", "clip_fea", "full_ref", "y_camera")


def build_fun_model(case):
    """A FunWanModel from a case's config; the CLIP branch is there when the case has its weights
    (Wan2.1-Fun) and absent otherwise (Wan2.2-Fun `Wan2_2Transformer3DModel`)."""
    image_branch = any(k.startswith("img_emb.") for k in case.params)
    with torch.device("meta"):
        model = FunWanModel.from_config({**case.config, "image_branch": image_branch})
    return load_state_dict(model, case.params, source=case.path.name).eval()


def contexts(case, prefix="context"):
    keys = sorted((k for k in case.inputs if k.startswith(prefix) and k[len(prefix):].isdigit()),
                  key=lambda k: int(k[len(prefix):]))
    return [case.inputs[k] for k in keys]


@runner("fun_transformer")
def run_fun_transformer(case):
    model = build_fun_model(case)
    kwargs = {k: case.inputs[k] for k in FUN_INPUTS if k in case.inputs}
    with torch.no_grad():
        out = model(case.inputs["x"], case.inputs["t"], contexts(case), **kwargs)
    assert_close(out, case.outputs["out"], atol=1e-4, name=f"{case.path.name} out")


@runner("camera_plucker")
def run_camera_plucker(case):
    meta = case.meta
    out = plucker_embedding(case.inputs["cam_params"], meta["width"], meta["height"],
                            meta.get("original_pose_width", 1280), meta.get("original_pose_height", 720))
    assert_close(out, case.outputs["plucker"], atol=1e-4, name=f"{case.path.name} plucker")


def _trace_experts(case):
    """(low-noise model, high-noise model or None): a MoE case prefixes its experts' parameters with
    `transformer.` (low noise) and `transformer_2.` (high noise)."""
    if not any(k.startswith("transformer_2.") for k in case.params):
        return build_fun_model(case), None
    experts = []
    for prefix in ("transformer.", "transformer_2."):
        params = {k[len(prefix):]: v for k, v in case.params.items() if k.startswith(prefix)}
        experts.append(build_fun_model(type(case)(case.path, case.meta, params)))
    return tuple(experts)


def _sample_trace(case, cache):
    """The reference pipeline's loop (meta note): Euler steps on the case's sigmas, CFG batch split
    into a cond call and an uncond call, cfg skip by `cfg_skip_ratio`. Returns the final latents and
    the number of branches run per step."""
    from wan.samplers.cfg_skip import cfg_skipped

    meta, inputs = case.meta, case.inputs
    low, high = _trace_experts(case)
    if cache is not None:
        for model in (low, high):
            if model is not None:
                cache.attach(model)
    boundary = (meta.get("boundary") or 0) * 1000
    sigmas, timesteps = case.outputs["sigmas"], case.outputs["timesteps"]
    latents = inputs["latents"]
    kwargs = {k: inputs[k] for k in ("y", "clip_fea", "full_ref", "y_camera") if k in inputs}
    branches = []
    for i, t in enumerate(timesteps):
        model = high if high is not None and t.item() >= boundary else low
        t = t.reshape(1)

        def call(context, branch):
            if cache is None:
                return model(latents, t, [context], **kwargs)
            with cache.branch(branch):
                return model(latents, t, [context], **kwargs)

        cond = call(inputs["context_cond"], "cond")
        if cfg_skipped(i, len(timesteps), meta.get("cfg_skip_ratio") or 0):
            noise, n = cond, 1
        else:
            uncond = call(inputs["context_uncond"], "uncond")
            noise, n = uncond + meta["guidance_scale"] * (cond - uncond), 2
        branches.append(n)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * noise
    return latents, branches


@runner("teacache_trace")
def run_teacache_trace(case):
    from wan.teacache import TeaCache

    meta, out, name = case.meta, case.outputs, case.path.name
    with torch.no_grad():
        plain, _ = _sample_trace(case, None)
        assert_close(plain, out["final_no_cache"], atol=1e-4, name=f"{name} final_no_cache")
        cache = TeaCache(meta["coefficients"], num_steps=meta["steps"], threshold=meta["rel_l1_thresh"],
                         skip_start_steps=meta["num_skip_start_steps"])
        final, branches = _sample_trace(case, cache)
    assert branches == [int(b) for b in out["branches"]], f"{name}: branches per step {branches}"
    cond = [r for r in cache.trace if r["branch"] == "cond"]
    assert [r["computed"] for r in cond] == [bool(c) for c in out["computed"]], f"{name}: computed steps"
    uncond_computed = [r["computed"] for r in cache.trace if r["branch"] == "uncond"]
    expected_uncond = [bool(c) for c, b in zip(out["computed_uncond"], out["branches"]) if b == 2]
    assert uncond_computed == expected_uncond, f"{name}: computed uncond steps"
    for key, field in (("rel_l1", "rel"), ("acc_value", "acc")):
        ours = torch.tensor([-1.0 if r[field] is None else r[field] for r in cond], dtype=torch.float64)
        assert_close(ours, out[key], atol=1e-4, name=f"{name} {key}")
    assert_close(final, out["final"], atol=1e-4, name=f"{name} final")


@runner("lora_merge")
def run_lora_merge(case):
    from wan.lora_formats import merge_lora_files
    from wan.modules.model import WanModel

    with torch.device("meta"):
        model = WanModel.from_config(case.config)
    model = load_state_dict(model, case.params, source=case.path.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = {k[len("lora."):]: v for k, v in case.inputs.items() if k.startswith("lora.")}
    merged = merge_lora_files(model, [(lora, case.meta["multiplier"])])
    after = model.state_dict()
    for key, expected in case.outputs.items():
        assert_close(after[key.removeprefix("merged.")], expected, atol=1e-4, name=f"{case.path.name} {key}")
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted(case.meta["changed_keys"]), f"{case.path.name}: changed {changed}"
    merged.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "unmerge is not exact"
