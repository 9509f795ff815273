"""Results as people and machines read them: a terminal table, Markdown, JSON and PNG plots.

Results are plain dicts, one per model variant ("row"), with any of the keys ``scheme``, ``bpw``,
``size_bytes``, ``memory_bytes``, ``perplexity``, ``kl_divergence``, ``top1_agreement``,
``decode_tokens_per_s``. The first row is the baseline (normally fp32) that the relative columns
(Δ% perplexity, speed-up) compare against. Missing values print as "–".

The report folder (:func:`write_report`) holds report.md, results.json and, on request, report.html:
one self-contained page (plots embedded as data: URIs, inline CSS, no scripts, no requests).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch). Every file is
written to a temporary name in the target folder and renamed when complete.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import html as _htmllib
import json
import logging
import math
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table

__all__ = [
    "COLUMNS",
    "Column",
    "markdown_table",
    "plot_layer_error",
    "plot_size_vs_perplexity",
    "plot_weight_histogram",
    "print_table",
    "table_cells",
    "table_columns",
    "to_json",
    "write_html_report",
    "write_report",
]

log = logging.getLogger(__name__)

MISSING = "–"


def _number(x) -> float | None:
    """A finite-or-infinite float, or None for missing / NaN / non-numeric values."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _key(name: str, scale: float = 1.0) -> Callable[[dict, dict], float | None]:
    def get(row: dict, base: dict) -> float | None:
        x = _number(row.get(name))
        return None if x is None else x * scale

    return get


def _relative(name: str, percent: bool) -> Callable[[dict, dict], float | None]:
    """row[name] / base[name] (a ratio) or its change in percent."""

    def get(row: dict, base: dict) -> float | None:
        x, b = _number(row.get(name)), _number(base.get(name))
        if x is None or b is None or b == 0:
            return None
        return (x / b - 1.0) * 100.0 if percent else x / b

    return get


def _adaptive(x: float) -> str:
    """Megabytes and the like: more decimals for small numbers."""
    if abs(x) >= 100:
        return f"{x:,.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


@dataclass(frozen=True)
class Column:
    """One column of the compare table: header, how to get its value from (row, baseline row),
    and how to print it (a format string or a function)."""

    header: str
    get: Callable[[dict, dict], float | str | None]
    fmt: str | Callable[[float], str] = "{}"
    numeric: bool = True
    better: str | None = None  # "lower" or "higher": the HTML report marks the best value

    def cell(self, row: dict, base: dict) -> str:
        value = self.get(row, base)
        if value is None or value == "":
            return MISSING
        if not self.numeric:
            return str(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


#: The compare table, in order. Δ% and speed-up are relative to the first row.
COLUMNS: tuple[Column, ...] = (
    Column("scheme", lambda row, base: row.get("scheme"), numeric=False),
    Column("bpw", _key("bpw"), "{:.2f}"),
    Column("size MB", _key("size_bytes", 1e-6), _adaptive),
    Column("memory MB", _key("memory_bytes", 1e-6), _adaptive),
    Column("perplexity", _key("perplexity"), "{:,.3f}", better="lower"),
    Column("Δ%", _relative("perplexity", percent=True), "{:+.2f}%", better="lower"),
    Column("KLD", _key("kl_divergence"), "{:.4g}", better="lower"),
    Column("top-1", _key("top1_agreement", 100.0), "{:.2f}%", better="higher"),
    Column("tokens/s", _key("decode_tokens_per_s"), "{:,.1f}", better="higher"),
    Column("speed-up", _relative("decode_tokens_per_s", percent=False), "{:.2f}×", better="higher"),
)

#: The compare table of an encoder (evaluate/hidden.py: no perplexity, no decode).
ENCODER_COLUMNS: tuple[Column, ...] = COLUMNS[:4] + (
    Column("embedding cos", _key("embedding_cosine"), "{:.5f}", better="higher"),
    Column("min cos", _key("embedding_cosine_min"), "{:.5f}", better="higher"),
    Column("hidden NMSE", _key("hidden_nmse"), "{:.3g}", better="lower"),
)

#: Shown after "scheme" when any row names the library that made it (peer comparisons).
LIBRARY = Column("library", lambda row, base: row.get("library"), numeric=False)


def table_columns(rows: list[dict]) -> tuple[Column, ...]:
    """COLUMNS (ENCODER_COLUMNS for rows measured on hidden states), with a "library" column
    after "scheme" when any row has a ``library``."""
    cols = ENCODER_COLUMNS if any("embedding_cosine" in row for row in rows) else COLUMNS
    if any(row.get("library") not in (None, "") for row in rows):
        return (cols[0], LIBRARY, *cols[1:])
    return cols


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The formatted cells of the compare table, one list per row (same order as table_columns)."""
    base = rows[0] if rows else {}
    columns = table_columns(rows)
    return [[col.cell(row, base) for col in columns] for row in rows]


def _best(rows: list[dict]) -> list[set[int]]:
    """Per column of table_columns(rows): the indices of the rows holding its best value, among the
    rows after the baseline (the first row), for columns with a ``better`` direction and at least
    two such values; empty sets elsewhere."""
    base = rows[0] if rows else {}
    out = []
    for col in table_columns(rows):
        values = {}
        if col.better and col.numeric:
            for i, row in enumerate(rows[1:], start=1):
                v = _number(col.get(row, base))
                if v is not None and math.isfinite(v):
                    values[i] = v
        if len(values) < 2 or len(set(values.values())) < 2:
            out.append(set())
            continue
        best = (min if col.better == "lower" else max)(values.values())
        out.append({i for i, v in values.items() if v == best})
    return out


def print_table(rows: list[dict], title: str | None = None, console: Console | None = None) -> Table:
    """Print the compare table to the terminal with rich (numbers right-aligned); returns it."""
    cells = table_cells(rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in table_columns(rows):
        table.add_column(col.header, justify="right" if col.numeric else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    console = console or Console()
    # Never squash or cut numbers: when the console is narrower than the table (80 columns
    # when piped), print it at its natural width and let long lines run on.
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    width = console.width
    if natural > width:
        console.width = natural
    try:
        console.print(table, crop=False)
    finally:
        console.width = width
    return table


def markdown_table(rows: list[dict]) -> str:
    """The compare table as GitHub Markdown: header, alignment line, one line per row."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    columns = table_columns(rows)
    lines = [
        line(col.header for col in columns),
        "|" + "|".join("---:" if col.numeric else ":---" for col in columns) + "|",
    ]
    lines += [line(cells) for cells in table_cells(rows)]
    return "\n".join(lines) + "\n"


def _plain(obj, digits: int):
    """JSON-ready copy of ``obj``: floats to ``digits`` significant digits, NaN/inf to None."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, digits)
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _plain(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, digits) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [_plain(v, digits) for v in sorted(obj, key=str)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist(), digits)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), digits)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _plain(obj.tolist(), digits)
    return str(obj)


def to_json(obj, indent: int | None = 2, digits: int = 6) -> str:
    """JSON text for results: floats rounded to ``digits`` significant digits, NaN/inf as null,
    paths, tensors, numpy values and dataclasses turned into plain JSON values."""
    return json.dumps(_plain(obj, digits), indent=indent, ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Files


def report_folder(dir: str | Path) -> Path:
    """The report folder, created and marked as quantkit's (io.atomic.MARKER) so that a later
    report may write into it; a folder of someone else's is refused (io.atomic.check_output)."""
    from quantkit.io.atomic import MARKER, check_output

    dir = check_output(dir, "report")
    dir.mkdir(parents=True, exist_ok=True)
    if not (dir / MARKER).exists():
        (dir / MARKER).write_text(json.dumps({"kind": "report"}) + "\n", encoding="utf-8")
    return dir


def _atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    from quantkit.io.atomic import atomic_file

    with atomic_file(path, mode) as fh:
        write(fh)
    return Path(path)


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return _atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=110))


# ---------------------------------------------------------------------------------------------
# Plots


def plot_weight_histogram(
    w_before: torch.Tensor,
    w_after_by_scheme: dict[str, torch.Tensor],
    path: str | Path,
    title: str = "weights before and after quantization",
    bins: int = 400,
) -> Path:
    """Histogram (log counts) of the float weights and of each scheme's dequantized weights.

    One panel per scheme, the float weights drawn behind in grey, so the grid of representable
    values shows as spikes. The legend gives each scheme's relative error ‖w − ŵ‖ / ‖w‖.
    """
    w = w_before.detach().float().flatten().cpu()
    after = {name: t.detach().float().flatten().cpu() for name, t in w_after_by_scheme.items()}
    finite = [t[torch.isfinite(t)] for t in [w, *after.values()]]
    lo = min(float(t.min()) for t in finite if t.numel())
    hi = max(float(t.max()) for t in finite if t.numel())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1).numpy()

    def counts(t: torch.Tensor):
        return torch.histc(t, bins=bins, min=lo, max=hi).numpy()

    panels = list(after.items()) or [(None, None)]
    fig = Figure(figsize=(8, 2.2 * len(panels) + 0.8))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    before = counts(w)
    for ax, (name, q) in zip(axes, panels):
        ax.stairs(before, edges, fill=True, color="0.75", label="float")
        if q is not None:
            label = name
            if q.shape == w.shape and w.norm() > 0:
                label += f" (rel. err {float((w - q).norm() / w.norm()):.2%})"
            ax.stairs(counts(q), edges, color="C0", linewidth=0.9, label=label)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set_ylabel("count")
        ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("weight value")
    fig.suptitle(title)
    return _save(fig, path)


def plot_size_vs_perplexity(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Size (MB) against perplexity — or KL divergence (encoders: hidden NMSE) when more rows have that — one annotated
    point per scheme, with the Pareto front (smaller and better) dashed. Rows without both values
    are left out; the x axis is memory MB when no row has a size on disk."""
    size_key = "size_bytes" if any(_number(r.get("size_bytes")) is not None for r in rows) else "memory_bytes"
    sized = [r for r in rows if _number(r.get(size_key)) is not None]

    def plottable(metric: str) -> list[tuple[float, float, str]]:
        return [
            (_number(r[size_key]) / 1e6, _number(r.get(metric)), str(r.get("scheme", "?")))
            for r in sized
            if _number(r.get(metric)) is not None and math.isfinite(_number(r.get(metric)))
        ]

    # Perplexity unless fewer rows have it than have a KL divergence (or, for encoders, a hidden NMSE).
    metric, points = "perplexity", plottable("perplexity")
    for other in ("kl_divergence", "hidden_nmse"):
        more = plottable(other)
        if len(more) > len(points):
            metric, points = other, more
    if not points:
        raise ValueError("no row has a size together with a perplexity, KL divergence or hidden NMSE to plot")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    xs, ys, names = zip(*points)
    ax.scatter(xs, ys, color="C0", zorder=3)
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    front, best = [], math.inf
    for x, y, _ in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="C1", zorder=2, label="Pareto front")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("size MB" if size_key == "size_bytes" else "memory MB")
    label = {"perplexity": "perplexity", "kl_divergence": "KL divergence", "hidden_nmse": "hidden-state NMSE"}[metric]
    ax.set_ylabel({"kl_divergence": "KL divergence to reference (nats)",
                   "hidden_nmse": "hidden-state NMSE to reference"}.get(metric, label))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"size vs {label}")
    return _save(fig, path)


def plot_layer_error(errors: dict[str, float], path: str | Path, title: str | None = None) -> Path:
    """Horizontal bar chart of per-layer relative weight error ‖W − Ŵ‖ / ‖W‖, in the given order."""
    if not errors:
        raise ValueError("no per-layer errors to plot")
    names = list(errors)
    values = [_number(v) or 0.0 for v in errors.values()]
    fig = Figure(figsize=(8, max(2.5, 0.22 * len(names) + 1.2)))
    ax = fig.subplots()
    ax.barh(range(len(names)), values, color="C0")
    ax.set_yticks(range(len(names)), names, fontsize="x-small" if len(names) > 30 else "small")
    ax.set_ylim(len(names) - 0.4, -0.6)  # first layer on top, no empty band above or below
    ax.set_xlabel("relative weight error ‖W − Ŵ‖ / ‖W‖")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or "per-layer quantization error")
    return _save(fig, path)


def sensitivity_heatmap(sens, folder: str | Path) -> Path:
    """`folder`/sensitivity.png: one panel per scheme, log10 of each layer's damage (mean KL when
    quantized alone) with layer kinds as rows and block indices as columns. `sens` is a
    plan.Sensitivity (layers named <blocks>.<index>.<path>)."""
    import numpy as np

    folder = report_folder(folder)
    cells = {}
    for name in sens.layers:
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if m:
            cells[(m.group(2), int(m.group(1)))] = name
    kinds = list(dict.fromkeys(k for k, _ in cells))
    n_blocks = 1 + max(b for _, b in cells) if cells else 0
    if not kinds:
        raise ValueError("no block layers to plot")
    fig = Figure(figsize=(max(6.0, 0.25 * n_blocks + 2.5), 1.0 + 0.32 * len(kinds) * len(sens.schemes) + 0.6 * len(sens.schemes)))
    axes = fig.subplots(len(sens.schemes), 1, squeeze=False)[:, 0]
    vals = [v for n in sens.layers for v in sens.kld[n].values() if math.isfinite(v) and v > 0]
    lo, hi = (math.log10(min(vals)), math.log10(max(vals))) if vals else (-6, 0)
    for ax, sc in zip(axes, sens.schemes):
        grid = np.full((len(kinds), n_blocks), np.nan)
        for (kind, b), name in cells.items():
            v = sens.kld[name][sc]
            grid[kinds.index(kind), b] = math.log10(max(v, 10**lo)) if math.isfinite(v) else np.nan
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize="x-small")
        ax.set_xticks(range(0, n_blocks, max(1, n_blocks // 15)))
        ax.set_title(f"{sc}: log10 KL when quantized alone", fontsize="small")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1].set_xlabel("block")
    return _save(fig, folder / "sensitivity.png")


def plot_fronts(series: dict[str, list[tuple[float, float, str]]], path: str | Path, ylabel: str = "perplexity",
                title: str | None = None, xlabel: str = "size MB (model.safetensors)", lines: bool | set = True,
                logy: bool = False, reference: float | None = None) -> Path:
    """Size (MB) against a quality metric for several series (e.g. uniform schemes vs planned
    mixes): each series is a list of (size_bytes, value, label) points, drawn as a line (``lines``
    True, or the set of series names drawn as lines; the others are points). ``reference``: a
    horizontal dashed line (e.g. the float model's perplexity); ``logy``: logarithmic y axis."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    markers = "os^Dv<>PX*h"
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(p for p in pts if math.isfinite(p[1]))
        if not pts:
            continue
        xs = [p[0] / 1e6 for p in pts]
        ys = [p[1] for p in pts]
        joined = lines is True or (isinstance(lines, set) and name in lines)
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=f"C{i}", label=name,
                linestyle="-" if joined else "none", markersize=6)
        for x, y, (_, _, label) in zip(xs, ys, pts):
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small",
                            color=f"C{i}")
    if reference is not None:
        ax.axhline(reference, color="0.4", linestyle="--", linewidth=1)
        ax.annotate("float reference", (ax.get_xlim()[1], reference), textcoords="offset points", xytext=(-4, 3),
                    ha="right", fontsize="x-small", color="0.4")
    if logy:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"size vs {ylabel}")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The report folder


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


#: An extra report section: (title, Markdown text). In report.html the text is rendered with
#: markdown-it (raw HTML in it is escaped, not passed through).
Section = tuple[str, str]


@dataclass
class _Content:
    """Everything a report shows, built once (:func:`_content`) and rendered as Markdown or HTML."""

    title: str
    meta: dict                    # all of it, for results.json
    rows: list[dict]
    images: dict[str, Path]       # plot name -> existing image file
    generations: dict[str, str]
    notes: list[str]              # Markdown, one bullet each, below the results table
    sections: list[Section]

    @property
    def shown_meta(self) -> dict:
        return {k: v for k, v in self.meta.items() if k not in ("title", "prompt")}

    @property
    def prompt(self) -> str | None:
        return str(self.meta["prompt"]) if self.meta.get("prompt") else None

    @property
    def caption(self) -> str | None:
        if not self.rows:
            return None
        return f"Δ% and speed-up are relative to the first row ({self.rows[0].get('scheme', '?')})."


def _content(
    rows: list[dict],
    generations: dict[str, str] | None,
    plots: dict[str, Path],
    meta: dict,
    notes: list[str] | None = None,
    sections: list[Section] | None = None,
) -> _Content:
    meta = dict(meta)
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("machine", _machine())
    images: dict[str, Path] = {}
    for name, p in (plots or {}).items():
        p = Path(p)
        if p.is_file():
            images[name] = p
        else:
            log.warning("plot %s not found at %s; left out of the report", name, p)
    title = meta.get("title") or f"quantkit report — {meta.get('model', 'model')}"
    return _Content(str(title), meta, list(rows), images, dict(generations or {}), [str(n) for n in notes or []],
                    [(str(t), str(body)) for t, body in sections or []])


def _relpath(path: Path, dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(dir).resolve())).as_posix()


def _markdown(c: _Content, dir: Path) -> str:
    md = [f"# {c.title}", "", "| | |", "|---|---|"]
    for key, value in c.shown_meta.items():
        text = str(value).replace("\n", " ").replace("|", "\\|")
        md.append(f"| {key} | `{text}` |" if key == "command" else f"| {key} | {text} |")
    md += ["", "## Results", "", markdown_table(c.rows)]
    if c.caption:
        md += [c.caption, ""]
    if c.notes:
        md += [f"- {note}" for note in c.notes] + [""]
    for title, body in c.sections:
        md += [f"## {title}", "", body.strip(), ""]
    if c.images:
        md += ["## Plots", ""]
        for name, path in c.images.items():
            md += [f"### {name}", "", f"![{name}]({_relpath(path, dir)})", ""]
    if c.generations:
        md += ["## Generations", ""]
        if c.prompt:
            md += ["Prompt:", "", _fence(c.prompt) + "text", c.prompt, _fence(c.prompt), ""]
        for scheme, text in c.generations.items():
            fence = _fence(text)
            md += [f"### {scheme}", "", fence + "text", text, fence, ""]
    return "\n".join(md).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# report.html

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}

_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1f2328;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 32px 48px; }
h1 { font-size: 1.7em; margin: .3em 0 .4em; }
h2 { font-size: 1.3em; margin: 1.8em 0 .6em; padding-bottom: .2em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05em; margin: 1.3em 0 .5em; }
nav { color: #57606a; margin-bottom: 1em; }
nav a { color: #0969da; text-decoration: none; margin-right: 1em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: .88em; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; display: block; max-width: 100%; overflow-x: auto; }
th, td { padding: 4px 10px; text-align: left; vertical-align: top; border-bottom: 1px solid #d8dee4; }
thead th { background: #eef1f4; border-bottom: 2px solid #afb8c1; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f6f8fa; }
.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #dafbe1; }
table.meta th { color: #57606a; font-weight: 600; white-space: nowrap; }
table.meta td { overflow-wrap: anywhere; }
table.meta tbody tr:nth-child(even) { background: none; }
.scroll { overflow-x: auto; }
.caption { color: #57606a; font-size: .9em; margin: .6em 0; }
.section { overflow-x: auto; }
figure { margin: .5em 0 1.5em; }
figure img { display: block; max-width: 100%; height: auto; }
.tall { max-height: 900px; overflow-y: auto; display: inline-block; max-width: 100%; border: 1px solid #d0d7de; }
.prompt { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; }
.gens { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; margin-top: 12px; }
.gen { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; }
.gen h3 { margin: 0 0 .4em; font-size: .95em; }
.gen pre, .prompt { font-family: inherit; font-size: .95em; }
.empty { color: #8c959f; font-style: italic; }
footer { margin-top: 3em; color: #8c959f; font-size: .85em; }
""".strip()

_TALL_PX = 1400  # images taller than this get a scroll frame in report.html

# No scripts, no fetches: everything the page shows is inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(text) -> str:
    return _htmllib.escape(str(text), quote=True)


def _markdown_html(text: str, inline: bool = False) -> str:
    """Markdown (CommonMark + tables) as HTML, raw HTML escaped; escaped text if markdown-it is missing."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # markdown-it-py comes with rich; this is only a fallback
        return _esc(text) if inline else f"<pre>{_esc(text)}</pre>"
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return md.renderInline(text) if inline else md.render(text)


def _data_uri(path: Path) -> tuple[str, tuple[int, int] | None]:
    """The file as a data: URI, and its (width, height) when it is a PNG."""
    data = path.read_bytes()
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    size = None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii"), size


def _html_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    best = _best(rows)
    out = ['<div class="scroll"><table class="results">', "<thead><tr>"]
    num = ' class="num"'
    out += [f"<th{num if col.numeric else ''}>{_esc(col.header)}</th>" for col in columns]
    out.append("</tr></thead><tbody>")
    for i, cells in enumerate(table_cells(rows)):
        tds = []
        for j, (col, cell) in enumerate(zip(columns, cells)):
            cls = (["num"] if col.numeric else []) + (["best"] if i in best[j] else [])
            attr = f' class="{" ".join(cls)}"' if cls else ""
            tds.append(f"<td{attr}>{_esc(cell)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _html(c: _Content) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{_esc(c.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_esc(c.title)}</h1>",
    ]
    links = [("results", "Results")] + [(f"section-{i}", t) for i, (t, _) in enumerate(c.sections, start=1)]
    if c.images:
        links.append(("plots", "Plots"))
    if c.generations:
        links.append(("generations", "Generations"))
    parts.append("<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in links) + "</nav>")

    parts.append('<table class="meta"><tbody>')
    for key, value in c.shown_meta.items():
        shown = f"<code>{_esc(value)}</code>" if key == "command" else _esc(value)
        parts.append(f"<tr><th>{_esc(key)}</th><td>{shown}</td></tr>")
    parts.append("</tbody></table>")

    parts += ['<h2 id="results">Results</h2>', _html_table(c.rows)]
    if c.caption:
        marked = any(_best(c.rows))
        extra = " Highlighted: the best value in its column among the rows after the first." if marked else ""
        parts.append(f'<p class="caption">{_esc(c.caption + extra)}</p>')
    if c.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_markdown_html(n, inline=True)}</li>" for n in c.notes)
                     + "</ul>")
    for i, (title, body) in enumerate(c.sections, start=1):
        parts += [f'<h2 id="section-{i}">{_esc(title)}</h2>', f'<div class="section">{_markdown_html(body)}</div>']

    if c.images:
        parts.append('<h2 id="plots">Plots</h2>')
        for name, path in c.images.items():
            uri, size = _data_uri(path)
            dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
            img = f'<img src="{uri}" alt="{_esc(name)}"{dims}>'
            if size and size[1] > _TALL_PX:  # e.g. one bar per layer: scroll inside the page
                img = f'<div class="tall">{img}</div><p class="caption">Tall figure: scroll inside the frame.</p>'
            parts.append(f"<figure><h3>{_esc(name)}</h3>{img}</figure>")

    if c.generations:
        parts.append('<h2 id="generations">Generations</h2>')
        if c.prompt:
            parts += ['<p class="caption">Prompt (greedy continuations below):</p>',
                      f'<pre class="prompt">{_esc(c.prompt)}</pre>']
        parts.append('<div class="gens">')
        for scheme, text in c.generations.items():
            body = f"<pre>{_esc(text)}</pre>" if text.strip() else '<p class="empty">(empty)</p>'
            parts.append(f'<article class="gen"><h3>{_esc(scheme)}</h3>{body}</article>')
        parts.append("</div>")

    parts += ["<footer>Written by quantkit.</footer>", "</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(
    dir: str | Path,
    rows: list[dict],
    generations: dict[str, str] | None,
    plots: dict[str, Path],
    meta: dict,
    *,
    html: bool = False,
    notes: list[str] | None = None,
    sections: list[Section] | None = None,
) -> Path:
    """Write ``report.md`` and ``results.json`` (and ``report.html`` when ``html``) into ``dir``;
    returns the path of report.md.

    The report holds a title, the run's metadata (model, text, tokens, date, machine, command, and
    anything else in ``meta``; date and machine are filled in when absent), the compare table (with
    a "library" column when rows have one), ``notes`` (Markdown bullets under the table), extra
    ``sections`` ((title, Markdown) pairs), the plots (missing files are skipped with a warning)
    and the greedy generations per scheme (after ``meta["prompt"]`` if given). report.md links the
    plots by path relative to ``dir``; report.html embeds them (see :func:`write_html_report`).
    results.json holds the same data for machines. All files are written atomically.
    """
    dir = report_folder(dir)
    c = _content(rows, generations, plots, meta, notes, sections)
    report = dir / "report.md"
    _atomic_write(report, lambda fh: fh.write(_markdown(c, dir)), mode="w")
    if html:
        _atomic_write(dir / "report.html", lambda fh: fh.write(_html(c)), mode="w")
    images = {name: _relpath(p, dir) for name, p in c.images.items()}
    results = {"meta": c.meta, "rows": c.rows, "generations": c.generations, "plots": images}
    if c.notes:
        results["notes"] = c.notes
    if c.sections:
        results["sections"] = [{"title": t, "text": body} for t, body in c.sections]
    _atomic_write(dir / "results.json", lambda fh: fh.write(to_json(results) + "\n"), mode="w")
    return report


def write_html_report(
    dir: str | Path,
    rows: list[dict],
    generations: dict[str, str] | None,
    plots: dict[str, Path],
    meta: dict,
    *,
    notes: list[str] | None = None,
    sections: list[Section] | None = None,
) -> Path:
    """Write ``report.html`` into ``dir`` (same content as :func:`write_report`'s report.md) and
    return its path.

    One self-contained page: the plots are embedded as base64 data: URIs, the CSS is inline, there
    is no script, and a Content-Security-Policy forbids any request, so it can be mailed or
    attached as is. Every text is HTML-escaped; ``notes`` and ``sections`` are Markdown.
    Check it with ``python scripts/check_report.py DIR/report.html --screenshot shot.png``.
    """
    dir = report_folder(dir)
    c = _content(rows, generations, plots, meta, notes, sections)
    return _atomic_write(dir / "report.html", lambda fh: fh.write(_html(c)), mode="w")
