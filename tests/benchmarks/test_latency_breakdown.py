"""The latency breakdown's arithmetic: the ratio's split adds up, the floor uses the fastest
baseline convolution with a fair share of the MACs, and the report renders it."""

import importlib.util
from pathlib import Path

import pytest

from yoloprune.kernels.profile import ConvTime, OrtProfile

ROOT = Path(__file__).resolve().parents[2]
MACHINE = {"cpu": "test cpu", "cpu_flags": ["avx2"], "cores_available": 2, "onnxruntime": "1.0"}


@pytest.fixture(scope="module")
def breakdown():
    path = ROOT / "benchmarks" / "latency_breakdown.py"
    spec = importlib.util.spec_from_file_location("latency_breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile(convs: list[tuple[float, int]], other_ms: float) -> OrtProfile:
    conv_ms = sum(ms for ms, _ in convs)
    return OrtProfile(
        runs=1,
        run_ms=conv_ms + other_ms + 1.0,
        op_ms={"Conv": conv_ms, "QuickGelu": other_ms},
        convs=[ConvTime(f"c{i}", ms, macs) for i, (ms, macs) in enumerate(convs)],
    )


def test_split_adds_up_and_the_floor_uses_the_fastest_fair_convolution(breakdown):
    # baseline: 10 ms at 100 GMAC/s, 10 ms at 200, and a tiny conv at 1000 GMAC/s (below 1 %)
    base = profile([(10.0, 1_000_000_000), (10.0, 2_000_000_000), (0.01, 10_000_000)], 5.0)
    pruned = profile([(6.0, 600_000_000), (6.0, 900_000_000)], 4.0)
    assert breakdown.peak_throughput(base) == pytest.approx(200.0)
    split = breakdown.split_ratio(pruned, base)
    total = base.kernel_ms  # 25.01
    assert split["ratio"] == pytest.approx(16.0 / total)
    mean = base.conv_gmacs_per_s  # 3.01 GMAC in 20.01 ms
    assert split["macs_share"] == pytest.approx(1.5 / mean * 1e3 / total)
    assert split["macs_share"] + split["conv_efficiency_lost"] + split["rest"] == pytest.approx(
        split["ratio"]
    )
    assert split["rest"] == pytest.approx(4.0 / total)
    assert split["floor"] == pytest.approx((1.5 / 200.0 * 1e3 + 4.0) / total)
    assert split["conv_macs_ratio"] == pytest.approx(1.5 / 3.01)
    assert split["other_ms_ratio"] == pytest.approx(0.8)


def test_median_dict_counts_a_missing_key_as_zero(breakdown):
    assert breakdown.median_dict([{"a": 1.0, "b": 3.0}, {"a": 3.0}, {"a": 2.0, "b": 1.0}]) == {
        "a": 2.0,
        "b": 1.0,
    }


def test_render_and_plot(breakdown, tmp_path):
    base = profile([(10.0, 2_000_000_000)], 2.0)
    pruned = profile([(6.0, 1_000_000_000)], 1.5)
    recipes = {}
    for key, p in {"baseline": base, breakdown.DEFAULT_ROW: pruned}.items():
        recipes[key] = {
            "conv_ms": p.conv_ms,
            "other_ms": p.other_ms,
            "conv_gmacs_per_s": p.conv_gmacs_per_s,
            "op_ms": p.op_ms,
            "split": breakdown.split_ratio(p, base),
        }
    result = {
        "machine": MACHINE,
        "threads": 2,
        "runs": 3,
        "passes": 1,
        "rows": [{"model": "m.yaml", "recipes": recipes, "peak_gmacs_per_s": 200.0}],
    }
    text = breakdown.render(result)
    # 12 ms -> 7.5 ms; 1 GMAC at the baseline's 200 GMAC/s is 5 ms, run in 6; rest 1.5 ms
    row = "| m.yaml | yoloprune (default flags) | 0.500 | 0.625 | 0.417 | +0.083 | 0.125 | 0.542 |"
    assert row in text
    assert "- m.yaml: QuickGelu 2.00 → 1.50" in text
    breakdown.plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
