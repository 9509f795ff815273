"""Schemes: what a quantized weight stores (kind, bits, granularity, symmetry).

One grammar is used everywhere (CLI, API, saved configs)::

    fp32 | bf16 | fp16
    int{2..8}[-g{N}|-tensor][-sym|-asym]     no -g = per output channel; -g-1 = per channel
    nf4[-b{N}][-dq]   fp4[-b{N}][-dq]        block size N (default 64), -dq = double quant
    fp8-e4m3 | fp8-e5m2                      per output channel scale
    llm-int8[-t{X}]                          int8 per channel + float outlier input columns at run
                                             time: those with |x| > X (default 6.0, the paper's)
    gguf-{q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q3_k|q4_k|q5_k|q6_k|iq4_nl}
                                             a GGML block type, stored as the GGUF file stores it
    w8a8-dynamic                             int8 weights per channel, int8 activations per token
                                             (scale computed at run time), integer matmul
    w8a8-static[-{minmax|ema|entropy|mse|percentile}][-asym][-o{N}]
                                             int8 weights per channel, int8 activations per tensor
                                             with a range frozen from calibration data by that
                                             observer (default mse; -asym: affine activations;
                                             -oN: the N input channels with the largest calibrated
                                             range stay in float, fixed at calibration)

A scheme says *what* is stored; the method (rtn, llm-int8, gptq, ...) says how the
values are chosen.  `parse_scheme` is the only parser and `Scheme.validate_for` the only
shape check; both raise `SchemeError` with a message that lists what is valid.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import SchemeError

GROUP_SIZES = (32, 64, 128, 256, 1024)  # int{N}-g{G}: the group sizes the grammar accepts
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # nf4-b{N} / fp4-b{N}: the block sizes it accepts
MAX_ACT_OUTLIERS = 1024  # w8a8-static-...-oN: at most this many float input channels
INT_BITS = tuple(range(2, 9))
PACKED_BITS = (2, 3, 4)  # bit widths stored packed below one byte
PER_CHANNEL = -1
PER_TENSOR = 0

GRAMMAR = (
    "fp32, bf16, fp16, int{2..8}[-g{32|64|128|256|1024}|-tensor][-sym|-asym], "
    "nf4[-b{N}][-dq], fp4[-b{N}][-dq], fp8-e4m3, fp8-e5m2, llm-int8[-t{X}], "
    "gguf-{q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q3_k|q4_k|q5_k|q6_k|iq4_nl}, "
    "w8a8-dynamic, w8a8-static[-{minmax|ema|entropy|mse|percentile}][-asym][-o{N}]"
)
ACT_OBSERVERS = ("minmax", "ema", "entropy", "mse", "percentile")  # observers.OBSERVERS, by name
DEFAULT_ACT_OBSERVER = "mse"
# GGML block types a scheme can name: type -> (values per block, nominal bits, symmetric).
# Their byte layouts live in formats/ggml.py and formats/ggml_k.py.
GGUF_TYPES = {
    "Q8_0": (32, 8, True), "Q4_0": (32, 4, True), "Q4_1": (32, 4, False), "Q5_0": (32, 5, True),
    "Q5_1": (32, 5, False), "IQ4_NL": (32, 4, True), "Q2_K": (256, 2, False), "Q3_K": (256, 3, True),
    "Q4_K": (256, 4, False), "Q5_K": (256, 5, False), "Q6_K": (256, 6, True),
}
# llama.cpp's replacement when a row is not a multiple of the type's block (llama_tensor_get_type)
GGUF_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
EXAMPLES = ("int8", "int4-g128", "int3-g64-sym", "nf4-dq", "fp4-b64", "fp8-e4m3", "bf16", "llm-int8", "w8a8-static-mse")


@dataclass(frozen=True)
class Scheme:
    """A validated storage scheme. Build it with `parse_scheme`, not by hand."""

    kind: str  # "float" | "int" | "nf4" | "fp4" | "fp8" | "llm-int8" | "ggml"
    bits: int
    symmetric: bool = True
    group_size: int = PER_CHANNEL  # int: -1 per channel, 0 per tensor, N per group; nf4/fp4: block size
    double_quant: bool = False  # nf4/fp4: 8-bit quantized block scales (blocks of 256)
    fp_format: str = ""  # "e4m3"/"e5m2" for fp8; "fp32"/"bf16"/"fp16" for float; GGML type for ggml
    act: str = ""  # activation quantization of int8 weights: "" none, "dynamic" (per token), "static" (frozen)
    observer: str = ""  # static: the observer that chooses the activation range (observers.py)
    act_symmetric: bool = True  # static: symmetric int8 or affine (uint8 + zero point) activations
    act_outliers: int = 0  # static: input channels kept in float (those with the largest calibrated range)
    threshold: float = 6.0  # llm-int8: input columns with |x| above it run in float (the paper's 6.0)

    @property
    def name(self) -> str:
        """Canonical string; `parse_scheme(s.name) == s`."""
        if self.act == "dynamic":
            return "w8a8-dynamic"
        if self.act == "static":
            return (f"w8a8-static-{self.observer}" + ("" if self.act_symmetric else "-asym")
                    + (f"-o{self.act_outliers}" if self.act_outliers else ""))
        if self.kind == "float":
            return self.fp_format
        if self.kind == "fp8":
            return f"fp8-{self.fp_format}"
        if self.kind == "llm-int8":
            return "llm-int8" if self.threshold == 6.0 else f"llm-int8-t{self.threshold:g}"
        if self.kind == "ggml":
            return f"gguf-{self.fp_format.lower()}"
        if self.kind in ("nf4", "fp4"):
            return f"{self.kind}-b{self.group_size}" + ("-dq" if self.double_quant else "")
        g = "" if self.group_size == PER_CHANNEL else ("-tensor" if self.group_size == PER_TENSOR else f"-g{self.group_size}")
        default_sym = self.bits == 8
        sym = "" if self.symmetric == default_sym else ("-sym" if self.symmetric else "-asym")
        return f"int{self.bits}{g}{sym}"

    def __str__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        """True for plain casts (fp32/bf16/fp16): nothing to quantize."""
        return self.kind == "float"

    @property
    def needs(self) -> frozenset:
        """Statistics the pipeline must gather for this scheme (besides the method's own)."""
        return frozenset({"act_range"}) if self.act == "static" else frozenset()

    @property
    def grouped(self) -> bool:
        return self.group_size > 0

    def with_group(self, group_size: int) -> "Scheme":
        return replace(self, group_size=group_size)

    def group_for(self, in_features: int) -> int:
        """Effective group (or block) length along the input dimension for a given width."""
        if self.group_size == PER_CHANNEL:
            return in_features
        if self.group_size == PER_TENSOR:
            return in_features  # one scale for the whole tensor; groups are whole rows
        return self.group_size

    def validate_for(self, shape: tuple[int, ...], name: str = "tensor") -> None:
        """Refuse a weight shape this scheme cannot hold exactly (group must divide the width)."""
        if len(shape) != 2:
            raise SchemeError(f"{name}: expected a 2-D weight, got shape {tuple(shape)}")
        if self.kind == "ggml" and shape[1] % self.group_size:
            raise SchemeError(f"{name}: {self.fp_format} needs input widths that are a multiple of "
                              f"{self.group_size}; this one is {shape[1]}")
        if self.act_outliers and self.act_outliers >= shape[1]:
            fewer = replace(self, act_outliers=min(MAX_ACT_OUTLIERS, max(1, shape[1] // 64))).name
            raise SchemeError(f"{name}: {self.name} keeps {self.act_outliers} input channels in float, but the "
                              f"layer has only {shape[1]}; choose fewer (e.g. {fewer})")
        if self.grouped and shape[1] % self.group_size:
            valid = self.groups_for(shape[1])
            what = "block" if self.kind in ("nf4", "fp4") else "group"
            sizes = f"{', '.join(str(s.group_size) for s in valid)} ({', '.join(s.name for s in valid)})" if valid else "none"
            per_channel = f"; or per channel: {self.with_group(PER_CHANNEL).name}" if self.kind == "int" else ""
            raise SchemeError(f"{name}: {what} size {self.group_size} does not divide the input width {shape[1]}; "
                              f"{what} sizes that divide it: {sizes}{per_channel}")

    def groups_for(self, in_features: int) -> "list[Scheme]":
        """This scheme with each group (block) size its grammar accepts that divides `in_features`."""
        sizes = {"int": GROUP_SIZES, "nf4": BLOCK_SIZES, "fp4": BLOCK_SIZES}.get(self.kind, ())
        return [self.with_group(g) for g in sizes if in_features % g == 0] if self.grouped else []

    def fallback_for(self, in_features: int) -> "Scheme | None":
        """The same scheme with the largest smaller group size that divides `in_features` and
        that the grammar accepts (GROUP_SIZES for int, BLOCK_SIZES for nf4/fp4), so a checkpoint
        that records it loads again.

        Used at model level (llama.cpp does the same for K-quants): a model whose widths a
        group size does not divide gets, for those layers only, the closest smaller group; the
        choice is logged and recorded per layer. None if no accepted size divides.
        """
        if not self.grouped or in_features % self.group_size == 0:
            return self
        if self.kind == "ggml":  # llama.cpp's chain: Q4_K -> Q5_0, Q6_K -> Q8_0, ...
            nxt = GGUF_FALLBACK.get(self.fp_format)
            return None if nxt is None else gguf_scheme(nxt).fallback_for(in_features)
        smaller = [s for s in self.groups_for(in_features) if s.group_size < self.group_size]
        return smaller[-1] if smaller else None


_INT_RE = re.compile(r"^int(\d+)((?:-g-?\d+)|(?:-tensor))?(-sym|-asym)?$")
_BLOCK_RE = re.compile(r"^(nf4|fp4)(?:-b(\d+))?(-dq)?$")
_W8A8_RE = re.compile(r"^w8a8-(dynamic|static)(?:-([a-z]+))?(-sym|-asym)?(?:-o(\d+))?$")


def gguf_scheme(type_name: str) -> Scheme:
    """The scheme of GGML block type `type_name` (e.g. "Q4_K")."""
    t = type_name.upper()
    if t not in GGUF_TYPES:
        raise SchemeError(f"unknown GGUF block type {type_name!r}; known: {', '.join(GGUF_TYPES)}")
    block, bits, sym = GGUF_TYPES[t]
    return Scheme(kind="ggml", bits=bits, symmetric=sym, group_size=block, fp_format=t)


def _threshold(t: str, text) -> float:
    """The outlier threshold X of llm-int8-tX: a positive number (bitsandbytes' llm_int8_threshold)."""
    try:
        v = float(t)
    except ValueError:
        v = float("nan")
    if not (0 < v < float("inf")):
        raise SchemeError(f"invalid scheme {text!r}: llm-int8-t{{X}} takes a positive outlier threshold X "
                          "(e.g. llm-int8-t4.5; plain llm-int8 is the paper's 6.0)")
    return v


def parse_scheme(text: "str | Scheme") -> Scheme:
    """Parse a scheme string (see module docstring). Raises SchemeError listing the grammar."""
    if isinstance(text, Scheme):
        return text
    s = str(text).strip().lower()
    if s in ("fp32", "bf16", "fp16"):
        return Scheme(kind="float", bits={"fp32": 32, "bf16": 16, "fp16": 16}[s], fp_format=s)
    if s in ("fp8-e4m3", "fp8-e5m2"):
        return Scheme(kind="fp8", bits=8, symmetric=True, group_size=PER_CHANNEL, fp_format=s[4:])
    if s == "llm-int8" or s.startswith("llm-int8-t"):
        return Scheme(kind="llm-int8", bits=8, symmetric=True, group_size=PER_CHANNEL,
                      threshold=_threshold(s[len("llm-int8-t"):], text) if s != "llm-int8" else 6.0)
    if s.startswith("gguf-"):
        return gguf_scheme(s[5:])
    if s.startswith("w8a8"):
        return _parse_w8a8(s, text)
    m = _INT_RE.match(s)
    if m:
        bits = int(m.group(1))
        if bits not in INT_BITS:
            raise SchemeError(f"unknown bit width {bits} in {text!r}: integer schemes take 2 to 8 bits ({GRAMMAR})")
        group = PER_CHANNEL
        if m.group(2) == "-tensor":
            group = PER_TENSOR
        elif m.group(2):
            group = int(m.group(2)[2:])
            if group != PER_CHANNEL and group not in GROUP_SIZES:
                raise SchemeError(
                    f"invalid group size {group} in {text!r}: the group sizes are {', '.join(map(str, GROUP_SIZES))} "
                    f"(e.g. int{bits}-g128), or no -g for per channel (int{bits})"
                )
        symmetric = bits == 8 if m.group(3) is None else m.group(3) == "-sym"
        return Scheme(kind="int", bits=bits, symmetric=symmetric, group_size=group)
    m = _BLOCK_RE.match(s)
    if m:
        block = int(m.group(2)) if m.group(2) else 64
        if block not in BLOCK_SIZES:
            raise SchemeError(f"invalid block size {block} in {text!r}: use a power of two from 32 to 4096, e.g. "
                              f"{m.group(1)}-b128 (no -b: {m.group(1)}, blocks of 64)")
        return Scheme(kind=m.group(1), bits=4, symmetric=True, group_size=block, double_quant=bool(m.group(3)))
    raise SchemeError(f"unknown scheme {text!r}; valid: {GRAMMAR} (e.g. {', '.join(EXAMPLES)})")


def _parse_w8a8(s: str, text) -> Scheme:
    m = _W8A8_RE.match(s)
    if not m:
        raise SchemeError(f"unknown scheme {text!r}; activation schemes are w8a8-dynamic and "
                          f"w8a8-static[-{{{'|'.join(ACT_OBSERVERS)}}}][-asym][-o{{N}}]")
    kind, obs, sym, outl = m.groups()
    if kind == "dynamic":
        if obs or sym or outl:
            raise SchemeError(f"{text!r}: w8a8-dynamic takes no observer, symmetry or outlier channels (its scales "
                              "are per token, symmetric, computed at run time)")
        return Scheme(kind="int", bits=8, symmetric=True, group_size=PER_CHANNEL, act="dynamic")
    obs = obs or DEFAULT_ACT_OBSERVER
    if obs not in ACT_OBSERVERS:
        raise SchemeError(f"unknown observer {obs!r} in {text!r}; valid: "
                          f"{', '.join('w8a8-static-' + o for o in ACT_OBSERVERS)}")
    n_out = int(outl) if outl else 0
    if outl and not 1 <= n_out <= MAX_ACT_OUTLIERS:
        raise SchemeError(f"{text!r}: -o{outl} keeps {outl} input channels in float; use 1 to {MAX_ACT_OUTLIERS} "
                          f"(e.g. w8a8-static-{obs}-o32)")
    return Scheme(kind="int", bits=8, symmetric=True, group_size=PER_CHANNEL, act="static", observer=obs,
                  act_symmetric=sym != "-asym", act_outliers=n_out)


def parse_schemes(text: str) -> list[Scheme]:
    """Parse a comma-separated list of schemes, refusing empty entries and duplicates."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise SchemeError(f"empty entry in scheme list {text!r}")
    schemes = [parse_scheme(t) for t in items]
    seen = set()
    for sc in schemes:
        if sc.name in seen:
            raise SchemeError(f"scheme {sc.name} is listed twice in {text!r}")
        seen.add(sc.name)
    return schemes
