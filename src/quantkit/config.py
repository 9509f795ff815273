"""The quantization config: a default scheme and method, mixed-precision rules, block
transforms and the head's storage; validated once at the API/CLI boundary (`make_config`).

`Rule` maps a name pattern to (scheme, method instance); `QuantConfig` is what `quantize`
takes and what a checkpoint records (`to_dict`, format 2: each method and transform as
{"name", "options"}; `from_dict` also reads format 1, where the method was a name and GPTQ's
options a separate "gptq" dict, and SmoothQuant a "smooth" alpha).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .algorithms import Method, Transform, method_of, recorded_method, transform_of
from .errors import SchemeError
from .scheme import Scheme, parse_scheme

HEAD_CHOICES = ("bf16", "fp16", "fp32", "int8", "keep")


@dataclass(frozen=True)
class Rule:
    """Mixed precision as data: layers whose name matches `pattern` get `scheme` with `method`;
    scheme None keeps the layer in its original precision.

    `pattern` is an fnmatch pattern matched as transformers matches `modules_to_not_convert`
    (quantizers_utils.should_convert_module), at module boundaries: against the full name
    ("model.layers.0.mlp.down_proj", "*.mlp.*"), against its last components ("down_proj" and
    "mlp.down_proj" name every such layer), or naming a parent module ("model.layers.0" names
    the layers inside it, not those of "model.layers.10"). `scheme` and `method` may be given
    as strings (parsed here).
    """

    pattern: str
    scheme: "Scheme | None"
    method: "Method | str" = "rtn"

    def __post_init__(self):
        if isinstance(self.scheme, str):
            object.__setattr__(self, "scheme", parse_scheme(self.scheme))
        object.__setattr__(self, "method", method_of(self.method))
        if not isinstance(self.pattern, str) or not self.pattern.strip(". "):
            raise SchemeError(f"a rule needs a module name or pattern, got {self.pattern!r} (e.g. 'down_proj' or '*.mlp.*')")

    def matches(self, name: str) -> bool:
        """Does `pattern` name the module called `name` (see the class docstring)?"""
        p = self.pattern
        return any(fnmatch.fnmatchcase(name, q) for q in (p, "*." + p, p + ".*"))


@dataclass(frozen=True)
class QuantConfig:
    """Everything `quantize` needs, validated once at the API/CLI boundary.

    `method` is a method instance (algorithms: RTN(), GPTQ(damp=...), ...); `transforms` are
    block transforms run before each block is quantized (SmoothQuant(alpha)). `head` is the
    storage of the embedding table and the output head ("bf16" by default, "int8", or "keep"
    for the original dtype); tied weights stay tied. `rules` are tried in order before the
    default scheme (see `Rule` for how names match); a rule naming the output head or the
    embedding table sets their one storage instead: scheme None keeps them in the original
    dtype, bf16/fp16/fp32/int8 store them so. `strict_groups` refuses layers whose input width
    the group size does not divide instead of giving them the largest smaller group that does.
    """

    scheme: Scheme
    method: Method
    head: str = "bf16"
    rules: tuple[Rule, ...] = ()
    strict_groups: bool = False
    sequential: bool = False  # calibrated methods: quantize a block's Linears in sequential groups
    transforms: tuple[Transform, ...] = ()

    def methods(self) -> list[Method]:
        """The default method and every rule's (for a rule that stores something)."""
        return [self.method] + [r.method for r in self.rules if r.scheme is not None]

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.name,
            "method": self.method.record(),
            "head": self.head,
            "rules": [[r.pattern, None if r.scheme is None else r.scheme.name, r.method.record()] for r in self.rules],
            "strict_groups": self.strict_groups,
            "sequential": self.sequential,
            "transforms": [t.record() for t in self.transforms],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Read `to_dict`'s output, or a format-1 record ("method": "gptq", "gptq": {...},
        "smooth": alpha). A method this version cannot run (qat, qlora-merge) stays a record."""
        v1_gptq = d.get("gptq") or {}

        def method(m):
            if isinstance(m, str) and m == "gptq" and v1_gptq:
                m = {"name": "gptq", "options": v1_gptq}
            return recorded_method(m)

        rules = tuple(Rule(p, None if s is None else parse_scheme(s), method(m)) for p, s, m in d.get("rules", []))
        transforms = tuple(transform_of(t) for t in d.get("transforms", []))
        if d.get("smooth") is not None:
            transforms += (transform_of({"name": "smoothquant", "options": {"alpha": d["smooth"]}}),)
        return cls(parse_scheme(d["scheme"]), method(d.get("method", "rtn")), d.get("head", "bf16"), rules,
                   bool(d.get("strict_groups", False)), bool(d.get("sequential", False)), transforms)


def default_head(sc: Scheme) -> str:
    """Embeddings/head storage when none is asked: 16-bit, or the scheme itself for casts."""
    return {"fp32": "keep", "bf16": "bf16", "fp16": "fp16"}.get(sc.name, "bf16")


def make_config(scheme: "str | Scheme", method: "Method | str | dict | None" = None, head: "str | None" = None,
                rules=(), strict_groups=False, sequential: bool = False, transforms=()) -> QuantConfig:
    """Validate user input once and build a QuantConfig (the only place that checks it).

    method: a name ("rtn", "gptq", ...), an instance (GPTQ(damp=0.05)) or a record; None is
    "llm-int8" for the llm-int8 scheme and "rtn" otherwise. transforms: names, instances
    (SmoothQuant(0.5)) or records. Every method is checked against the schemes it must store."""
    sc = parse_scheme(scheme)
    head = default_head(sc) if head is None else str(head).lower()
    if head not in HEAD_CHOICES:
        raise SchemeError(f"invalid head storage {head!r}; valid: {', '.join(HEAD_CHOICES)}")
    m = method_of(method if method is not None else ("llm-int8" if sc.kind == "llm-int8" else "rtn"))
    if m.name == "llm-int8" and sc.kind != "llm-int8":
        raise SchemeError(f"method llm-int8 stores scheme llm-int8, not {sc.name}; use --scheme llm-int8")
    rules = tuple(rules)
    if not all(isinstance(r, Rule) for r in rules):
        raise SchemeError("rules must be Rule(pattern, scheme, method) objects")
    cfg = QuantConfig(sc, m, head, rules, bool(strict_groups), bool(sequential), tuple(transform_of(t) for t in transforms))
    cfg.method.check(cfg.scheme)
    for r in cfg.rules:
        if r.scheme is not None:
            r.method.check(r.scheme)
    return cfg
