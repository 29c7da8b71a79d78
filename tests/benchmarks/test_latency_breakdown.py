"""The latency breakdown benchmark's medians over passes, its table and its plot (the split
itself: tests/kernels/test_profile.py)."""

import pytest

from tests.helpers import benchmark_module, ort_profile
from yoloprune.kernels.profile import split_against

MACHINE = {"cpu": "test cpu", "cpu_flags": ["avx2"], "cores_available": 2, "onnxruntime": "1.0"}


@pytest.fixture(scope="module")
def breakdown():
    return benchmark_module("latency_breakdown")


def test_median_dict_counts_a_missing_key_as_zero(breakdown):
    assert breakdown.median_dict([{"a": 1.0, "b": 3.0}, {"a": 3.0}, {"a": 2.0, "b": 1.0}]) == {
        "a": 2.0,
        "b": 1.0,
    }


def test_needed_share_render_and_plot(breakdown, tmp_path):
    base = ort_profile([(10.0, 2_000_000_000)], 2.0)
    pruned = ort_profile([(6.0, 1_000_000_000)], 1.5)
    recipes = {}
    for key, p in {"baseline": base, breakdown.DEFAULT_ROW: pruned}.items():
        recipes[key] = {
            "conv_ms": p.conv_ms,
            "other_ms": p.other_ms,
            "conv_gmacs_per_s": p.conv_gmacs_per_s,
            "op_ms": p.op_ms,
            "split": split_against(p, base),
        }
    # 0.50 of 12 ms leaves 6 - 1.5 ms for 1 GMAC: 222 GMAC/s, 111 % of the fastest 200
    share = breakdown.needed_share(pruned, base, 0.5)
    assert share == pytest.approx(1e9 / 4.5e-3 / 1e9 / 200.0)
    assert breakdown.needed_share(pruned, base, 0.1) == float("inf")  # the rest alone is 0.125
    recipes[breakdown.DEFAULT_ROW]["split"]["needed_share_of_fastest"] = share
    result = {
        "machine": MACHINE,
        "threads": 2,
        "runs": 3,
        "passes": 1,
        "rows": [{"model": "m.yaml", "recipes": recipes, "peak_gmacs_per_s": 200.0}],
    }
    text = breakdown.render(result)
    # 12 ms -> 7.5 ms; 1 GMAC at the baseline's 200 GMAC/s is 5 ms, run in 6; rest 1.5 ms
    row = "| m.yaml | yoloprune (default flags) | 0.500 | 0.625 | 0.417 | +0.083 | 0.125 | 0.542 "
    row += "| 111 % |"
    assert row in text
    assert "- m.yaml: QuickGelu 2.00 → 1.50" in text
    breakdown.plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
