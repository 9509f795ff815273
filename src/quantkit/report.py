"""Results as people and machines read them: a terminal table, Markdown, JSON and PNG plots.

Results are plain dicts, one per model variant ("row"), with any of the keys ``scheme``, ``bpw``,
``size_bytes``, ``memory_bytes``, ``perplexity``, ``kl_divergence``, ``top1_agreement``,
``decode_tokens_per_s``. The first row is the baseline (normally fp32) that the relative columns
(Δ% perplexity, speed-up) compare against. Missing values print as "–".

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch). Every file is
written to a temporary name in the target folder and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import math
import os
import platform
import re
import tempfile
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
    "to_json",
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
    Column("perplexity", _key("perplexity"), "{:,.3f}"),
    Column("Δ%", _relative("perplexity", percent=True), "{:+.2f}%"),
    Column("KLD", _key("kl_divergence"), "{:.4g}"),
    Column("top-1", _key("top1_agreement", 100.0), "{:.2f}%"),
    Column("tokens/s", _key("decode_tokens_per_s"), "{:,.1f}"),
    Column("speed-up", _relative("decode_tokens_per_s", percent=False), "{:.2f}×"),
)


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The formatted cells of the compare table, one list per row (same order as COLUMNS)."""
    base = rows[0] if rows else {}
    return [[col.cell(row, base) for col in COLUMNS] for row in rows]


def print_table(rows: list[dict], title: str | None = None, console: Console | None = None) -> Table:
    """Print the compare table to the terminal with rich (numbers right-aligned); returns it."""
    cells = table_cells(rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in COLUMNS:
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

    lines = [
        line(col.header for col in COLUMNS),
        "|" + "|".join("---:" if col.numeric else ":---" for col in COLUMNS) + "|",
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


def _atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """Size (MB) against perplexity — or KL divergence when more rows have that — one annotated
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

    # Perplexity unless fewer rows have it than have a KL divergence.
    metric, points = "perplexity", plottable("perplexity")
    by_kld = plottable("kl_divergence")
    if len(by_kld) > len(points):
        metric, points = "kl_divergence", by_kld
    if not points:
        raise ValueError("no row has a size together with a perplexity or KL divergence to plot")

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
    ax.set_ylabel("perplexity" if metric == "perplexity" else "KL divergence to reference (nats)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"size vs {'perplexity' if metric == 'perplexity' else 'KL divergence'}")
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
    ax.invert_yaxis()
    ax.set_xlabel("relative weight error ‖W − Ŵ‖ / ‖W‖")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or "per-layer quantization error")
    return _save(fig, path)


def sensitivity_heatmap(sens, folder: str | Path) -> Path:
    """`folder`/sensitivity.png: one panel per scheme, log10 of each layer's damage (mean KL when
    quantized alone) with layer kinds as rows and block indices as columns. `sens` is a
    plan.Sensitivity (layers named <blocks>.<index>.<path>)."""
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
                title: str | None = None) -> Path:
    """Size (MB) against a quality metric for several series (e.g. uniform schemes vs planned
    mixes): each series is a list of (size_bytes, value, label) points, drawn as a line."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(p for p in pts if math.isfinite(p[1]))
        if not pts:
            continue
        xs = [p[0] / 1e6 for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=name)
        for x, y, (_, _, label) in zip(xs, ys, pts):
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xlabel("size MB (model.safetensors)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
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


def write_report(
    dir: str | Path,
    rows: list[dict],
    generations: dict[str, str] | None,
    plots: dict[str, Path],
    meta: dict,
) -> Path:
    """Write ``report.md`` and ``results.json`` into ``dir``; returns the path of report.md.

    report.md holds a title, the run's metadata (model, text, tokens, date, machine, command, and
    anything else in ``meta``; date and machine are filled in when absent), the compare table,
    the plots (linked by path relative to ``dir``; missing files are skipped with a warning) and
    the greedy generations per scheme (after ``meta["prompt"]`` if given). results.json holds the
    same data for machines. Both files are written atomically.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("machine", _machine())

    images: dict[str, str] = {}
    for name, p in plots.items():
        p = Path(p)
        if p.is_file():
            images[name] = Path(os.path.relpath(p.resolve(), dir.resolve())).as_posix()
        else:
            log.warning("plot %s not found at %s; left out of the report", name, p)

    title = meta.get("title") or f"quantkit report — {meta.get('model', 'model')}"
    md = [f"# {title}", "", "| | |", "|---|---|"]
    for key, value in meta.items():
        if key in ("title", "prompt"):
            continue
        text = str(value).replace("\n", " ").replace("|", "\\|")
        md.append(f"| {key} | `{text}` |" if key == "command" else f"| {key} | {text} |")
    md += ["", "## Results", "", markdown_table(rows)]
    if rows:
        md.append(f"Δ% and speed-up are relative to the first row ({rows[0].get('scheme', '?')}).")
        md.append("")
    if images:
        md += ["## Plots", ""]
        for name, rel in images.items():
            md += [f"### {name}", "", f"![{name}]({rel})", ""]
    if generations:
        md += ["## Generations", ""]
        if meta.get("prompt"):
            prompt = str(meta["prompt"])
            md += ["Prompt:", "", _fence(prompt) + "text", prompt, _fence(prompt), ""]
        for scheme, text in generations.items():
            fence = _fence(text)
            md += [f"### {scheme}", "", fence + "text", text, fence, ""]

    report = dir / "report.md"
    _atomic_write(report, lambda fh: fh.write("\n".join(md).rstrip() + "\n"), mode="w")
    results = {"meta": meta, "rows": rows, "generations": generations or {}, "plots": images}
    _atomic_write(dir / "results.json", lambda fh: fh.write(to_json(results) + "\n"), mode="w")
    return report
