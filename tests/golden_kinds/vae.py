"""Golden runners for the causal video VAEs: normalized mean latents of `video`, decode of `z`."""

import torch

from golden_kinds import assert_close, runner
from wan.checkpoint import load_state_dict
from wan.modules.vae2_1 import WanVAE21
from wan.modules.vae2_2 import WanVAE22

VAE_CLASSES = {"vae2.1": WanVAE21, "vae2.2": WanVAE22}


@runner(*VAE_CLASSES)
def run_vae(case):
    with torch.device("meta"):
        model = VAE_CLASSES[case.kind](**case.config, latents_mean=case.meta["latents_mean"],
                                       latents_std=case.meta["latents_std"])
    load_state_dict(model, case.params, source=case.path.name)
    model.eval()
    with torch.no_grad():
        mu = model.encode(case.inputs["video"])
        # The reference decodes without the final clamp to [-1, 1] (see the case's note).
        decoded = model.decode(case.inputs["z"], clamp=False)
    assert_close(mu, case.outputs["mu"], atol=1e-4, name=f"{case.path.name} mu")
    assert_close(decoded, case.outputs["decoded"], atol=0.0, rtol=1e-4, name=f"{case.path.name} decoded")
