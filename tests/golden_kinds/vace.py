"""Golden runners for Wan2.1 VACE: `vace` (VaceWanModel forward) and `vace_encode` (the context
encoding of masked frames, packed mask and reference images with the Wan2.1 VAE)."""

import torch

from golden_kinds import EXT_DIR, assert_close, golden_dir, runner
from pipelines.vace_context import encode_frames, pack_mask
from wan.checkpoint import load_state_dict
from wan.modules.vace import VaceWanModel
from wan.modules.vae2_1 import WanVAE21

golden_dir(EXT_DIR / "variants" / "golden", "vace", "vace_encode")


@runner("vace")
def run_vace(case):
    config = {**case.config, "vace_layers": case.meta.get("vace_layers", case.config.get("vace_layers"))}
    with torch.device("meta"):
        model = VaceWanModel.from_config(config)
    load_state_dict(model, case.params, source=case.path.name)
    model.eval()
    assert list(model.vace_layers) == list(case.meta["vace_layers"])
    num_samples = len([k for k in case.inputs if k.startswith("x")])
    # The reference pads every sample to seq_len and masks the padding out of attention: a sample's
    # output is its own run's, so each runs as a batch of one.
    with torch.no_grad():
        for i in range(num_samples):
            out = model(case.inputs[f"x{i}"][None], case.inputs["t"][i:i + 1], case.inputs[f"context{i}"][None],
                        vace_context=case.inputs[f"vace_context{i}"][None],
                        context_scale=case.meta["vace_context_scale"])
            assert_close(out[0], case.outputs[f"out{i}"], atol=1e-4, name=f"{case.path.name} out{i}")


@runner("vace_encode")
def run_vace_encode(case):
    with torch.device("meta"):
        vae = WanVAE21(**case.meta["vae_config"], latents_mean=case.meta["latents_mean"],
                       latents_std=case.meta["latents_std"])
    load_state_dict(vae, case.params, source=case.path.name)
    vae.eval()
    for i in range(len(case.meta["samples"])):
        refs = [case.inputs[f"ref{i}_{j}"] for j in range(case.meta["samples"][i]["n_refs"])]
        z0 = encode_frames(vae, case.inputs[f"frames{i}"], case.inputs[f"masks{i}"], refs)
        m0 = pack_mask(case.inputs[f"masks{i}"], len(refs), case.meta["vae_stride"])
        assert_close(z0, case.outputs[f"z{i}"], atol=1e-4, name=f"{case.path.name} z{i}")
        assert_close(m0, case.outputs[f"m{i}"], atol=1e-4, name=f"{case.path.name} m{i}")
        context = f"vace_context{i}" if f"vace_context{i}" in case.outputs else "vace_context"
        assert_close(torch.cat([z0, m0]), case.outputs[context], atol=1e-4, name=f"{case.path.name} {context}")
