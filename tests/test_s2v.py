"""Wan2.2 S2V-14B: the released key set, model behaviour and the audio-driven clip-chaining pipeline."""

import json

import pytest
import torch

from golden_kinds import EXT_DIR
from wan.modules.s2v import WanS2VModel, s2v_config

MANIFESTS = EXT_DIR / "variants" / "manifests"


def test_s2v_state_dict_matches_official_manifest():
    manifest = json.loads((MANIFESTS / "wan2.2_s2v_14B.json").read_text())
    with torch.device("meta"):
        model = WanS2VModel.from_config(s2v_config())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_params"]


def test_s2v_rejects_unreleased_configurations():
    with pytest.raises(ValueError, match="enable_motioner"):
        WanS2VModel.from_config(s2v_config(enable_motioner=True, num_layers=1, dim=32, num_heads=2))
    with pytest.raises(ValueError, match="outside the 2 blocks"):
        WanS2VModel.from_config(s2v_config(audio_inject_layers=[0, 5], num_layers=2, dim=32, num_heads=2))
