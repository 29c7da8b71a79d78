"""The demo benchmarks' shared pieces: the writer (JSON, the plot where there is one, the
Markdown) and the order of their runs."""

import json

from tests.helpers import benchmark_module


def test_results_are_written_as_json_markdown_and_the_plot(tmp_path, monkeypatch, capsys):
    module = benchmark_module("demo_budget")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    result = {"runs": [1, 2]}
    plotted = []

    def plot(data, path):
        plotted.append(path.name)
        path.write_bytes(b"png")

    module.write_results("x", result, lambda data, png: f"table of {data['runs']}, {png}\n", plot)
    assert json.loads((tmp_path / "results" / "x.json").read_text()) == result
    assert (tmp_path / "results" / "x.md").read_text() == "table of [1, 2], x.png\n"
    assert plotted == ["x.png"] and "table of [1, 2], x.png" in capsys.readouterr().out
    module.write_results("y", result, lambda data: "no plot\n")
    assert (tmp_path / "results" / "y.md").read_text() == "no plot\n"
    assert not (tmp_path / "results" / "y.png").exists()


def test_each_seed_runs_every_recipe_back_to_back():
    module = benchmark_module("demo_budget")
    calls = []

    def run(seed, value):
        calls.append((seed, value))
        return seed * 10 + value

    runs = module.seeded_runs((0, 1), {"a": 1, "b": 2}, run)
    assert calls == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert runs == {"a": [1, 11], "b": [2, 12]}
