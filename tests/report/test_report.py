import json
import math

import pytest
import torch
from rich.console import Console

from quantkit.report import (  # noqa: I001
    report_folder,
    COLUMNS,
    markdown_table,
    plot_layer_error,
    plot_size_vs_perplexity,
    plot_weight_histogram,
    print_table,
    table_cells,
    to_json,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"scheme": "fp32", "bpw": 32.0, "size_bytes": 538_000_000, "memory_bytes": 538_100_000,
     "perplexity": 10.0, "kl_divergence": 0.0, "top1_agreement": 1.0, "decode_tokens_per_s": 20.0},
    {"scheme": "int8", "bpw": 8.0, "size_bytes": 140_000_000, "memory_bytes": 141_000_000,
     "perplexity": 10.1, "kl_divergence": 0.00123, "top1_agreement": 0.987, "decode_tokens_per_s": 30.0},
    {"scheme": "int4|g128", "bpw": 4.25, "size_bytes": 80_000_000, "perplexity": float("nan")},
]


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data.startswith(PNG_MAGIC)


def test_columns_in_order():
    assert [c.header for c in COLUMNS] == [
        "scheme", "bpw", "size MB", "memory MB", "perplexity", "Δ%", "KLD", "top-1", "tokens/s", "speed-up",
    ]


def test_cells_values_and_missing():
    fp32, int8, int4 = table_cells(ROWS)
    assert fp32[5] == "+0.00%" and fp32[9] == "1.00×"
    assert int8[1] == "8.00"
    assert int8[2] == "140.0"
    assert int8[5] == "+1.00%"
    assert int8[6] == "0.00123"
    assert int8[7] == "98.70%"
    assert int8[9] == "1.50×"
    assert int4[3] == "–" and int4[4] == "–" and int4[5] == "–" and int4[9] == "–"


def test_markdown_table():
    md = markdown_table(ROWS)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| scheme | bpw | size MB")
    assert set(lines[1]) <= set("|:-")
    assert len(lines) == 2 + len(ROWS)
    assert all(line.count("|") - line.count("\\|") == len(COLUMNS) + 1 for line in lines)
    assert "int4\\|g128" in lines[4]


def test_print_table():
    console = Console(record=True, width=60)  # narrower than the table: nothing may be cut
    print_table(ROWS, title="compare", console=console)
    text = console.export_text()
    assert "compare" in text and "int4|g128" in text and "98.70%" in text and "1.50×" in text and "–" in text
    assert console.width == 60


def test_to_json_round_trip():
    obj = {"rows": ROWS, "t": torch.tensor([1.5, 2.0]), "x": 1 / 3, "inf": float("inf"), "n": 7, "ok": True}
    back = json.loads(to_json(obj))
    assert back["rows"][1]["kl_divergence"] == pytest.approx(0.00123)
    assert back["rows"][2]["perplexity"] is None
    assert back["inf"] is None
    assert back["x"] == pytest.approx(1 / 3, rel=1e-5) and len(str(back["x"])) < 12
    assert back["t"] == [1.5, 2.0] and back["n"] == 7 and back["ok"] is True
    assert json.loads(to_json(back)) == back


def test_plots_are_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    scale = w.abs().max() / 7
    after = {"int4": (w / scale).round().clamp(-8, 7) * scale, "int8": (w / (scale / 16)).round() * (scale / 16)}
    hist = plot_weight_histogram(w, after, tmp_path / "hist.png", "layer 0 q_proj")
    only = plot_weight_histogram(w, {}, tmp_path / "only.png", "float only")
    front = plot_size_vs_perplexity(ROWS, tmp_path / "front.png")
    kld = plot_size_vs_perplexity([{"scheme": "a", "size_bytes": 1e6, "kl_divergence": 0.1}], tmp_path / "kld.png")
    err = plot_layer_error({f"layers.{i}.mlp": 0.01 * i for i in range(5)}, tmp_path / "err.png")
    for p in (hist, only, front, kld, err):
        assert _is_png(p)
    assert not list(tmp_path.glob(".*tmp"))


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError):
        plot_size_vs_perplexity([{"scheme": "a"}], tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_layer_error({}, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists()


def test_write_report(tmp_path):
    report_folder(tmp_path / "out")  # the report's folder first (as compare does), then its plots inside it
    plots_dir = tmp_path / "out" / "plots"
    err = plot_layer_error({"a": 0.1, "b": 0.2}, plots_dir / "err.png")
    front = plot_size_vs_perplexity(ROWS, plots_dir / "front.png")
    generations = {"fp32": "Once upon a time", "int8": "Once upon a ```tick```"}
    meta = {"model": "tiny-llama", "text": "wiki.test.raw", "tokens": 4096, "command": "quantkit compare x",
            "prompt": "Once"}
    report = write_report(tmp_path / "out", ROWS, generations, {"error": err, "front": front,
                                                                 "gone": tmp_path / "gone.png"}, meta)
    assert report == tmp_path / "out" / "report.md"
    md = report.read_text(encoding="utf-8")
    assert md.startswith("# quantkit report — tiny-llama")
    assert "| scheme | bpw |" in md and "quantkit compare x" in md and "machine" in md and "date" in md
    assert "![error](plots/err.png)" in md and "![front](plots/front.png)" in md and "gone" not in md
    for rel in ("plots/err.png", "plots/front.png"):
        assert (report.parent / rel).is_file()
    assert "Once upon a ```tick```" in md and "````text" in md
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["meta"]["model"] == "tiny-llama"
    assert len(results["rows"]) == 3 and results["rows"][2]["perplexity"] is None
    assert results["generations"] == generations
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".quantkit-output", "plots", "report.md", "results.json"]
    assert not math.isnan(results["rows"][0]["perplexity"])


def test_plot_fronts_points_lines_log_axis_and_reference(tmp_path):
    """Series drawn as lines or as points, a log y axis and a reference line: a real PNG comes out."""
    from quantkit.report import plot_fronts

    series = {"quantkit": [(105e6, 31.2, "mixed"), (163e6, 30.1, "int8")],
              "peer": [(132e6, 46.0, "int4"), (248e6, 100.7, "dyn int8"), (150e6, float("nan"), "skipped")]}
    for kw in ({"lines": True}, {"lines": {"quantkit"}, "logy": True, "reference": 30.15}, {"lines": False}):
        p = plot_fronts(series, tmp_path / f"front-{len(kw)}.png", xlabel="size MB (as stored)", **kw)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
