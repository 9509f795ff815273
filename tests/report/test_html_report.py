"""report.html: one self-contained page (write_report(html=True), write_html_report) and its checker."""
import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.io.atomic import MARKER
from quantkit.report import plot_layer_error, table_cells, table_columns, write_html_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHECKER = Path(__file__).resolve().parents[2] / "scripts" / "check_report.py"

ROWS = [
    {"scheme": "fp32", "bpw": 32.0, "size_bytes": 538_000_000, "perplexity": 10.0, "kl_divergence": 0.0,
     "top1_agreement": 1.0, "decode_tokens_per_s": 20.0},
    {"scheme": "int8", "bpw": 8.0, "size_bytes": 140_000_000, "perplexity": 10.1, "kl_divergence": 0.00123,
     "top1_agreement": 0.987, "decode_tokens_per_s": 30.0},
    {"scheme": "int4<g128>", "bpw": 4.25, "size_bytes": 80_000_000, "perplexity": 10.9, "kl_divergence": 0.05,
     "top1_agreement": 0.9, "decode_tokens_per_s": float("nan")},
]
GENERATIONS = {"fp32 (reference)": "the sea is deep", "int8": "the sea <script>alert(1)</script> & salt",
               "int4<g128>": ""}
META = {"model": "tiny & llama", "text": "wiki.test.raw", "tokens": 1024, "command": "quantkit compare x --y '<z>'",
        "prompt": "The ocean <is>"}


@pytest.fixture(scope="module")
def plot(tmp_path_factory):
    return plot_layer_error({"layers.0.mlp": 0.01, "layers.1.mlp": 0.02}, tmp_path_factory.mktemp("p") / "err.png")


def _report(tmp_path, plot, **kw):
    write_report(tmp_path, ROWS, GENERATIONS, {"Per-layer error": plot, "Gone": tmp_path / "gone.png"}, META,
                 html=True, **kw)
    return (tmp_path / "report.html").read_text(encoding="utf-8")


def test_html_is_one_self_contained_file(tmp_path, plot, caplog):
    page = _report(tmp_path / "out", plot)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "report.html", "report.md", "results.json"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing but data: URIs and in-page anchors; no scripts, no stylesheet links
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), refs
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    assert "Content-Security-Policy" in page
    # every image is an embedded PNG that decodes
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 1 and len(re.findall(r"<img\b", page)) == 1
    assert base64.b64decode(imgs[0], validate=True).startswith(PNG_MAGIC)
    # the missing plot is skipped with a warning, like in the Markdown
    assert "Gone" not in page and "Per-layer error" in page
    assert any("Gone" in r.getMessage() for r in caplog.records)


def test_html_escapes_text(tmp_path, plot):
    page = _report(tmp_path, plot)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; salt" in page
    assert "tiny &amp; llama" in page and "&lt;z&gt;" in page and "int4&lt;g128&gt;" in page
    assert "The ocean &lt;is&gt;" in page and page.count("The ocean &lt;is&gt;") == 1  # prompt shown once


def test_html_table_and_generations(tmp_path, plot):
    page = _report(tmp_path, plot)
    header = re.search(r"<thead>(.*?)</thead>", page, flags=re.S).group(1)
    assert [html.unescape(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", header)] == [c.header for c in table_columns(ROWS)]
    body = re.search(r"<tbody>.*?</tbody>", page.split('class="results"', 1)[1], flags=re.S).group(0)
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
             for tr in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)]
    assert cells == table_cells(ROWS)  # the same cells as the console and Markdown tables
    assert '<td class="num">8.00</td>' in body  # numbers right-aligned
    # best among the rows after the baseline: int8 has the lower perplexity and KLD, the higher top-1
    assert '<td class="num best">10.100</td>' in body and '<td class="num best">98.70%</td>' in body
    assert '<td class="num">10.000</td>' in body  # the baseline itself is not marked
    cards = re.findall(r'<article class="gen"><h3>(.*?)</h3>', page)
    assert [html.unescape(c) for c in cards] == list(GENERATIONS)
    assert "(empty)" in page


def test_library_column_notes_and_sections(tmp_path, plot):
    rows = [dict(r, library=lib) for r, lib in zip(ROWS, ["torch 2.13", "quantkit", "torchao 0.14"])]
    assert [c.header for c in table_columns(rows)][:3] == ["scheme", "library", "bpw"]
    assert [c.header for c in table_columns(ROWS)][1] == "bpw"
    notes = ["llama.cpp row: `llama-quantize` not found", "a <b>bold</b> claim"]
    sections = [("Peers", "Versions:\n\n| library | version |\n|---|---:|\n| torchao | 0.14 |\n\n<img src=x>")]
    path = write_html_report(tmp_path, rows, GENERATIONS, {"Per-layer error": plot}, META, notes=notes,
                             sections=sections)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<th>library</th>" in page and "<td>torchao 0.14</td>" in page
    assert "<code>llama-quantize</code>" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert '<h2 id="section-1">Peers</h2>' in page and '<a href="#section-1">' in page
    assert "<td>torchao</td>" in page and "&lt;img src=x&gt;" in page and "<img src=x>" not in page
    write_report(tmp_path / "md", rows, None, {}, META, notes=notes, sections=sections)
    md = (tmp_path / "md" / "report.md").read_text(encoding="utf-8")
    assert "| scheme | library | bpw |" in md and "- llama.cpp row" in md and "## Peers" in md
    assert json.loads((tmp_path / "md" / "results.json").read_text())["notes"] == notes


def test_markdown_and_html_share_the_meta(tmp_path, plot):
    page = _report(tmp_path, plot)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    date = json.loads((tmp_path / "results.json").read_text())["meta"]["date"]
    assert date in md and html.escape(date) in page


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Chromium (apt-get install chromium)")
def test_renders_in_headless_chromium(tmp_path, plot):
    _report(tmp_path, plot, notes=["a note"], sections=[("Extra", "text with `code`")])
    shot = tmp_path / "shot.png"
    run = subprocess.run([sys.executable, str(CHECKER), str(tmp_path / "report.html"), "--screenshot", str(shot),
                          "--browser", "/usr/bin/chromium"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "1 image(s) loaded" in run.stdout
    assert shot.read_bytes().startswith(PNG_MAGIC)
    # and it does catch a broken page: a missing image and a request to a file next to it
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><title>bad</title><img src="missing.png" alt="gone">', encoding="utf-8")
    run = subprocess.run([sys.executable, str(CHECKER), str(bad), "--browser", "/usr/bin/chromium"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "did not load" in run.stderr and "request outside the page" in run.stderr


def test_checker_without_a_browser(tmp_path):
    page = tmp_path / "r.html"
    page.write_text("<!DOCTYPE html><title>x</title>", encoding="utf-8")
    if shutil.which("definitely-not-a-browser"):
        pytest.skip("odd PATH")
    run = subprocess.run([sys.executable, str(CHECKER), str(page), "--browser", "definitely-not-a-browser"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no Chromium found" in run.stderr
