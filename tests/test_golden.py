"""Parity with the official implementations: every golden case in the reference folders and in
the folders of `WAN_GOLDEN_DIR` (colon-separated), dispatched on the case's `kind`."""

import pytest

from golden_kinds import GOLDEN_DIRS, golden_cases, load_case, load_runners

RUNNERS = load_runners()
CASES = golden_cases()


def test_reference_cases_present():
    assert CASES, f"no golden cases found in {GOLDEN_DIRS}; is ../shared/reference beside the checkout?"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden(path):
    case = load_case(path)
    if case.kind not in RUNNERS:
        pytest.fail(f"{path.name}: no runner for golden kind '{case.kind}' (known: {sorted(RUNNERS)})")
    RUNNERS[case.kind](case)
