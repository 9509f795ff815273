"""Quantize-on-load through transformers (QuantkitConfig) vs loading the float model: peak
memory and time, each in its own process, on SmolLM2 saved as a float32 Hugging Face folder.

    python benchmarks/hf_load.py [--schemes int4-g128,nf4-dq,int8]

The float folder is written once from the `smollm2` alias (the GGUF dequantized) into
--folder. "peak above start" is the process's high-water mark (VmHWM: anonymous memory and
the checkpoint's mapped pages) minus where it stood just before from_pretrained.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import write_section

CHILD = """
import json, sys, time
from quantkit.memory import rss_bytes
import quantkit as qk
from transformers import AutoModelForCausalLM
cfg = None if sys.argv[2] == "float" else qk.QuantkitConfig(scheme=sys.argv[2])
before = rss_bytes(peak=True)
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg)
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": rss_bytes(peak=True), "now": rss_bytes(peak=False), "seconds": seconds}))
"""


def float_folder(path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    import quantkit as qk

    model, tok = qk.load("smollm2")
    model.__dict__.pop("hf_quantizer", None)  # loaded from GGUF: save plain float weights
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default=str(Path.home() / ".cache" / "quantkit" / "smollm2-fp32-hf"))
    ap.add_argument("--schemes", default="int4-g128,nf4-dq,int8")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    folder = float_folder(Path(a.folder))
    fp32 = (folder / "model.safetensors").stat().st_size
    rows = []
    for scheme in ["float"] + a.schemes.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), scheme], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        up = r["peak"] - r["before"]
        rows.append(f"| {'float32 (no quantization)' if scheme == 'float' else 'QuantkitConfig(scheme=' + repr(scheme) + ')'} "
                    f"| {up / 1e6:.0f} | {up / fp32:.2f} | {(r['now'] - r['before']) / 1e6:.0f} | {r['seconds']:.1f} |")
    body = "\n".join([
        f"SmolLM2-135M float32 folder ({fp32 / 1e6:.0f} MB model.safetensors), `AutoModelForCausalLM.from_pretrained` "
        "in a fresh process per row. The float row maps the file lazily, so untouched weights are not resident.",
        "",
        "| load | peak above start MB | x float file | resident after MB | seconds |",
        "|---|---:|---:|---:|---:|",
        *rows])
    print(body)
    if not a.no_write:
        write_section("hf-load", "Quantize-on-load in transformers: peak memory", body)


if __name__ == "__main__":
    main()
