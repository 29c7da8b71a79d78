import math

import numpy as np
import pytest

from yoloprune.graphs.errors import LatencyTableError
from yoloprune.kernels.alignment import BANDS, Band, ChainShape, ChainTable, relative_latency
from yoloprune.kernels.latency_table import LatencyTable, TableKey, open_table

KEY = TableKey("ort", "test cpu", "fp32", 1, 1, True)


def stand_in(tmp_path, ms) -> ChainTable:
    """A chain table whose times are ``ms(shape)``; nothing is measured."""

    def never(shape):
        raise AssertionError(f"measured {shape}")

    table = ChainTable(KEY, tmp_path / "chains.json", never)
    table.entries = {s.key(): ms(s) for band in BANDS for s in band.shapes()}
    return table


def test_times_proportional_to_macs_make_every_alignment_equal(tmp_path):
    speed = relative_latency(stand_in(tmp_path, lambda s: s.macs() * 1e-9))
    assert speed == pytest.approx({8: 1.0, 16: 1.0, 32: 1.0}, rel=1e-12)


def test_a_penalty_off_the_16_channel_block_is_what_16_and_32_save(tmp_path):
    """Counts off a multiple of 16 take 1.5x their MACs' time: at those counts the aligned
    candidates interpolate the proportional neighbours (ratio 1/1.5), elsewhere they are exact.
    14 of the 30 profiled counts are off the block."""
    penalty = 1.5

    def ms(s: ChainShape) -> float:
        return s.macs() * 1e-9 * (penalty if s.channels % 16 else 1.0)

    off = sum(s.channels % 16 != 0 for band in BANDS for s in band.shapes())
    total = sum(len(band.shapes()) for band in BANDS)
    assert (off, total) == (14, 30)
    expected = penalty ** (-off / total)
    speed = relative_latency(stand_in(tmp_path, ms))
    assert speed[8] == 1.0
    assert speed[16] == pytest.approx(expected, rel=1e-12)
    assert speed[32] == pytest.approx(expected, rel=1e-12)


def test_bands_must_end_on_every_candidate(tmp_path):
    with pytest.raises(ValueError, match="candidate alignment"):
        relative_latency(stand_in(tmp_path, lambda s: 1.0), bands=(Band(8, 40, 64),))


def test_a_chain_runs_on_onnx_runtime_and_the_profile_is_cached(tmp_path):
    """Measured for real on a small band: positive times, saved, read back without measuring."""
    from yoloprune.kernels.ort import OrtRunner

    shape = ChainShape(16, 8)
    path = tmp_path / "chain.onnx"
    path.write_bytes(shape.onnx(1).SerializeToString())
    x = np.random.default_rng(0).random((1, 16, 8, 8), dtype=np.float32)
    with OrtRunner(path, 1) as runner:
        (out,) = runner.infer(x)
    assert out.shape == (1, 16, 8, 8) and np.isfinite(out).all()
    assert shape.macs() == (16 * 16 * (1 + 9 + 1 + 9)) * 64

    band = (Band(8, 32, 64),)
    table = open_table("ort", threads=1, path=tmp_path / "profile.json", kind=ChainTable)
    speed = relative_latency(table, bands=band)
    assert table.measured == 5 and all(v > 0 and math.isfinite(v) for v in table.entries.values())
    again = open_table("ort", threads=1, path=tmp_path / "profile.json", kind=ChainTable)
    assert relative_latency(again, bands=band) == speed and again.measured == 0


def test_a_per_layer_table_is_not_an_alignment_profile(tmp_path):
    path = tmp_path / "t.json"
    LatencyTable(KEY, path, lambda s: 1.0).save()
    with pytest.raises(LatencyTableError, match="not a yoloprune latency table"):
        ChainTable(KEY, path, lambda s: 1.0)


def test_the_ort_key_names_the_cpu_flags():
    """Two CPUs of one model name but different vector extensions keep separate caches."""
    from yoloprune.kernels.ort import machine_info

    table = open_table("ort", threads=1, kind=ChainTable)
    machine = machine_info()
    flags = ", ".join(machine["cpu_flags"]) or "flags unknown"
    assert table.key.device == f"{machine['cpu']} ({flags})"
    assert table.path.parent.name == "alignment"


def test_a_damaged_profile_names_its_own_fix(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    fix = r"measured again: about 2 s on ONNX Runtime CPU, an engine build per chain on TensorRT\)"
    with pytest.raises(LatencyTableError, match=fix + " or pass --round-to K"):
        ChainTable(KEY, path, lambda s: 1.0)


def test_gpu_runtimes_profile_the_same_counts_at_gpu_sizes(tmp_path):
    """On a GPU the CPU-sized chains take less than their launch: torch and tensorrt time the
    same channel counts at 160x160 and 80x80 (stride 4 and 8 of a 640 px input)."""
    from yoloprune.kernels.alignment import GPU_BANDS, bands_for

    assert bands_for("ort") == BANDS and bands_for("torch") == bands_for("tensorrt") == GPU_BANDS
    counts = [[s.channels for s in band.shapes()] for band in BANDS]
    assert [[s.channels for s in band.shapes()] for band in GPU_BANDS] == counts
    assert [band.size for band in GPU_BANDS] == [160, 80]
    table = ChainTable(KEY, tmp_path / "gpu.json", lambda s: s.macs() * 1e-9)
    speed = relative_latency(table, bands=GPU_BANDS)  # every band ends on every candidate
    assert speed == pytest.approx({8: 1.0, 16: 1.0, 32: 1.0}, rel=1e-12)
