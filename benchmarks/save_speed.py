"""Quantize -> save wall time of this checkout against an older commit, in one run, and whether
the two write the same tensors.

    git worktree add /tmp/quantkit-old d6b44bd
    python benchmarks/save_speed.py --old /tmp/quantkit-old [--scheme int4-g128] [--repeats 3]

Each timing is a fresh process that imports quantkit from one source tree (PYTHONPATH=TREE/src),
loads SmolLM2 (not timed), then times `qk.quantize(model, scheme)` and `qk.save(q, out)`. Old
and new runs alternate, so a slow spell of the machine hits both; the table gives the median.
Then it compares the two outputs: every tensor of model.safetensors byte for byte (and the
file itself), and the keys of `quantization_config` that differ. Run it with the machine to
yourself. Writes its table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
NEW = HERE.parents[1]


def worker(tree: str, out: str, scheme: str) -> None:
    import time

    import quantkit as qk

    src = str(Path(tree, "src").resolve())
    if not str(Path(qk.__file__).resolve()).startswith(src):
        raise SystemExit(f"imported quantkit from {qk.__file__}, not from {src}")
    model, tok = qk.load("smollm2")
    t0 = time.perf_counter()
    q = qk.quantize(model, scheme, progress=False)
    t1 = time.perf_counter()
    qk.save(q, out)
    t2 = time.perf_counter()
    print(json.dumps({"quantize_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0}))


def run(tree: Path, out: Path, scheme: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    r = subprocess.run([sys.executable, str(HERE), "--worker", str(tree), str(out), scheme],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"run in {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors import safe_open

    fa, fb = a / "model.safetensors", b / "model.safetensors"
    with safe_open(str(fa), "pt") as x, safe_open(str(fb), "pt") as y:
        ka, kb = set(x.keys()), set(y.keys())
        same = [k for k in sorted(ka & kb)
                if x.get_tensor(k).dtype == y.get_tensor(k).dtype and x.get_tensor(k).shape == y.get_tensor(k).shape
                and torch.equal(x.get_tensor(k).contiguous().view(torch.uint8), y.get_tensor(k).contiguous().view(torch.uint8))]
        meta_same = x.metadata() == y.metadata()
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
    differ = sorted(k for k in set(qa) | set(qb) if qa.get(k) != qb.get(k))
    cfg_differ = sorted(k for k in set(qa.get("config", {})) | set(qb.get("config", {}))
                        if qa.get("config", {}).get(k) != qb.get("config", {}).get(k))
    return {"tensors": len(ka), "identical": len(same), "only_one_side": sorted(ka ^ kb),
            "file_identical": fa.read_bytes() == fb.read_bytes(), "metadata_same": meta_same,
            "quantization_config_differs": differ, "config_differs": cfg_differ,
            "old_config": {k: qa.get("config", {}).get(k) for k in cfg_differ} | {"format_version": qa.get("format_version")},
            "new_config": {k: qb.get("config", {}).get(k) for k in cfg_differ} | {"format_version": qb.get("format_version")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="a checkout of the older commit (git worktree add ...)")
    p.add_argument("--scheme", default="int4-g128")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    old = a.old.resolve()
    if not (old / "src" / "quantkit").is_dir():
        raise SystemExit(f"error: {old} is not a quantkit checkout (no src/quantkit)")
    rev = subprocess.run(["git", "-C", str(old), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    times = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="qk-save-speed-") as tmp:
        for i in range(a.repeats):
            for side, tree in (("old", old), ("new", NEW)):
                out = Path(tmp) / f"{side}{i}"
                times[side].append(run(tree, out, a.scheme))
                print(side, i, times[side][-1], flush=True)
        cmp = compare(Path(tmp) / "old0", Path(tmp) / "new0")

    def med(side, key):
        return statistics.median(t[key] for t in times[side])

    rows = ["| code | quantize (s) | save (s) | quantize + save (s) |", "|---|---:|---:|---:|"]
    for side, label in (("old", f"old ({rev})"), ("new", "new (this checkout)")):
        rows.append(f"| {label} | {med(side, 'quantize_s'):.2f} | {med(side, 'save_s'):.2f} | {med(side, 'total_s'):.2f} |")
    drop = 1 - med("new", "total_s") / med("old", "total_s")
    body = "\n".join(rows) + (
        f"\n\nSmolLM2-135M, `{a.scheme}`, median of {a.repeats} alternating runs per side (model loading not timed): "
        f"quantize + save takes **{100 * drop:.0f}% less** time.\n\n"
        f"Output: {cmp['identical']} of {cmp['tensors']} tensors of model.safetensors byte-identical"
        f" (only on one side: {cmp['only_one_side'] or 'none'}); the file itself identical: {cmp['file_identical']};"
        f" safetensors metadata the same: {cmp['metadata_same']}.\n"
        f"quantization_config keys that differ: {', '.join(cmp['quantization_config_differs']) or 'none'};"
        f" inside `config`: {', '.join(cmp['config_differs']) or 'none'}"
        f" (old: `{json.dumps(cmp['old_config'])}`, new: `{json.dumps(cmp['new_config'])}`).")
    print(body)
    sys.path.insert(0, str(HERE.parent))
    from _common import write_section

    write_section("save-speed", f"Quantize -> save wall time, {a.scheme}: this checkout vs {rev}", body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
