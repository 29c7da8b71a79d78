"""The fine-tune budget sweep's bookkeeping: gaps over the seeds both recipes have, the table,
the plot, and resuming only under the same settings."""

import json

import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def budget():
    return benchmark_module("budget")


def sweep(budget, cells):
    return {
        "settings": {"macs": 0.3, "train_images": 2000, "lr0": 0.003},
        "machine": {"cpu": "test cpu", "cores_available": 2},
        "val_images": 300,
        "imgsz": 256,
        "recipes": {
            budget.OURS: {"recipe": "ours", "macs_kept": 0.299, "before": 0.229},
            budget.THEIRS: {"recipe": "theirs", "macs_kept": 0.301, "before": 0.0},
        },
        "cells": [
            {"recipe": r, "epochs": e, "seed": s, "map50_95": m, "finetune_s": 10.0 * e}
            for r, e, s, m in cells
        ],
    }


def test_gap_uses_only_the_seeds_both_recipes_have(budget):
    result = sweep(
        budget,
        [
            (budget.OURS, 2, 0, 0.76),
            (budget.THEIRS, 2, 0, 0.72),
            (budget.OURS, 2, 1, 0.74),
            (budget.THEIRS, 2, 1, 0.73),
            (budget.OURS, 2, 2, 0.10),  # no torch-pruning cell for seed 2: left out
            (budget.OURS, 4, 0, 0.78),  # no torch-pruning cell at 4 epochs: no row
        ],
    )
    (row,) = budget.summary(result)
    assert row["epochs"] == 2 and row["seeds"] == [0, 1]
    assert row["ours_mean"] == pytest.approx(0.75)
    assert row["theirs_mean"] == pytest.approx(0.725)
    assert row["gap_points"] == pytest.approx(2.5)
    assert row["gap_points_min"] == pytest.approx(1.0)


def test_save_writes_table_and_plot_atomically(budget, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "RESULTS", tmp_path)
    result = sweep(
        budget,
        [(budget.OURS, e, 0, 0.7 + e / 100) for e in (1, 2)]
        + [(budget.THEIRS, e, 0, 0.7) for e in (1, 2)],
    )
    budget.save(result)
    table = (tmp_path / "budget.md").read_text()
    assert "| 2 | 0 | 0.7200 | 0.7000 | 0.7200 | 0.7000 | +2.0 | +2.0 |" in table
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "budget.json").read_text())["summary"][1]["epochs"] == 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_resume_only_under_the_same_settings(budget, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "RESULTS", tmp_path)
    result = sweep(budget, [(budget.OURS, 1, 0, 0.7), (budget.THEIRS, 1, 0, 0.6)])
    budget.save(result)
    assert budget.load_previous(dict(result["settings"]))["cells"] == result["cells"]
    assert budget.load_previous({**result["settings"], "lr0": 0.001}) is None
