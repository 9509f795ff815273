"""Shared by the benchmark scripts: write a measured table into docs/benchmarks.md."""
from __future__ import annotations

import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def run_cli(args: list[str]) -> dict:
    """Run `quantkit ARGS --json` as its own process (its peak memory is its own); its JSON."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-m", "quantkit.cli", *args, "--json"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"quantkit {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                     "avx512_bf16", "amx_tile") if f in have]
                break
    except OSError:
        pass
    from quantkit.kernels import native

    if native.wonly():
        kernels = f"quantkit native kernels: {({1: 'avx2', 2: 'avx512'})[native.wonly_isa()]}"
    else:
        kernels = f"quantkit native kernels: off ({native.why_not_native() or 'the build failed'})"
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}, CPU flags: {' '.join(flags) or 'unknown'}; {kernels}")


def write_section(key: str, title: str, body: str, per_cpu: bool = False) -> None:
    """Replace (or append) the section `key` of docs/benchmarks.md with `body`.

    per_cpu: speed tables; one section per CPU instruction set (key suffixed with e.g. -avx2),
    since the fast kernels differ between AVX2 and AVX-512 CPUs and both results stay.
    """
    if per_cpu:
        cap = torch.backends.cpu.get_cpu_capability()
        key, title = f"{key}-{cap.lower()}", f"{title}, {cap} CPU"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEvery table here was written by the script named under it.\n"
    cmd = "python " + shlex.join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])  # quoted: copy-paste runs it
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- {key} -->\n## {title}\n\nMeasured {when} on {machine()}.\n"
               f"Command: `{cmd}`\n\n{body.strip()}\n<!-- /{key} -->")
    pat = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
