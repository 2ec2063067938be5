"""Golden reference cases: loading, discovery, and the registry of runners per `kind`.

Each module of this package adds runners to `RUNNERS` with the `runner(kind)` decorator. A runner
takes a `Case` and asserts that our implementation reproduces the reference outputs. The core
folder's cases all run; an extension module claims its cases in a shared extension folder with
`golden_dir(folder, *kinds)`. Every case of the `WAN_GOLDEN_DIR` folders runs (an unknown kind fails).
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("WAN_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
EXT_DIR = REFERENCE_DIR / "ext"
GOLDEN_DIRS = [REFERENCE_DIR / "golden"]
EXT_GOLDEN_KINDS = {}  # extension folder -> the kinds its registered runners take there

RUNNERS = {}


@dataclass
class Case:
    path: Path
    meta: dict
    params: dict = field(default_factory=dict)   # official key -> tensor ("param." stripped)
    inputs: dict = field(default_factory=dict)   # name -> tensor ("in." stripped)
    outputs: dict = field(default_factory=dict)  # name -> tensor ("out." stripped)

    @property
    def kind(self):
        return self.meta["kind"]

    @property
    def config(self):
        return self.meta.get("config", {})


def load_case(path):
    path = Path(path)
    case = None
    with safe_open(str(path), "pt") as f:
        case = Case(path, json.loads(f.metadata()["meta"]))
        for key in f.keys():
            group, name = key.split(".", 1)
            {"param": case.params, "in": case.inputs, "out": case.outputs}[group][name] = f.get_tensor(key)
    return case


def env_dirs(variable):
    return [Path(p) for p in os.environ.get(variable, "").split(":") if p]


def case_files(default_dirs, env_variable):
    files = []
    for folder in list(default_dirs) + env_dirs(env_variable):
        files.extend(sorted(Path(folder).glob("*.safetensors")))
    return files


def golden_dir(folder, *kinds):
    """Claims the cases of `kinds` in an extension golden folder (e.g. EXT_DIR / "pose" / "golden")."""
    EXT_GOLDEN_KINDS.setdefault(Path(folder), set()).update(kinds)


def case_kind(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])["kind"]


def golden_cases():
    """Every case to run: the core folders', the claimed extension cases, and `WAN_GOLDEN_DIR`'s."""
    files = case_files(GOLDEN_DIRS, "WAN_GOLDEN_DIR")
    for folder, kinds in sorted(EXT_GOLDEN_KINDS.items()):
        files.extend(p for p in sorted(folder.glob("*.safetensors")) if case_kind(p) in kinds)
    return files


def runner(*kinds):
    def register(fn):
        for kind in kinds:
            RUNNERS[kind] = fn
        return fn
    return register


def assert_close(actual, expected, atol=1e-4, rtol=0.0, name="output"):
    actual = actual.detach().float().cpu()
    expected = expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def load_runners():
    """Imports every runner module of this package so that all kinds are registered."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__name__}.{info.name}")
    return RUNNERS


def run_cases_of_kind(folder, kind):
    """Runs every case of `kind` in `folder` with its registered runner; returns how many ran."""
    cases = [p for p in sorted(Path(folder).glob("*.safetensors")) if case_kind(p) == kind]
    runner_of_kind = load_runners()[kind]
    for path in cases:
        runner_of_kind(load_case(path))
    return len(cases)
