"""What a weight method and a block transform are, and their two registries.

A **method** chooses the stored values of one weight: a frozen dataclass whose fields are its
options (with defaults), which declares the statistics it `needs` (collected by calibration,
see collectors.py) and the scheme kinds it can produce, and implements
`quantize(w [out, in], scheme, stats) -> QuantizedWeight`. It registers itself with
`@register_method`; `method_of("gptq")`, `method_of(GPTQ(damp=0.05))` and
`method_of({"name": "gptq", "options": {...}})` all give an instance.

A **transform** changes a block of the float model before its weights are quantized, keeping
the float function (SmoothQuant; AWQ-style scaling and rotations fit the same shape): a
frozen dataclass with options as fields, `needs`, and `apply(block, ctx)` (ctx: see
`TransformContext`). It registers itself with `@register_transform`.

Options are validated where the instance is built (`__post_init__`), so inner code trusts
them; `options()` / `from_options()` are what a checkpoint records and reads back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from ..errors import SchemeError
from ..formats import QuantizedWeight
from ..scheme import Scheme


class _Options:
    """Shared by methods and transforms: options as dataclass fields, recorded as a dict."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset()
    summary: ClassVar[str] = ""
    _what: ClassVar[str] = "method"

    def options(self) -> dict[str, Any]:
        """The options as plain values ({field: value}), as a checkpoint records them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_options(cls, options: "dict | None" = None):
        """Build from recorded options; unknown ones are refused by name."""
        options = dict(options or {})
        valid = {f.name for f in fields(cls)}
        unknown = set(options) - valid
        if unknown:
            raise SchemeError(f"unknown option(s) {', '.join(sorted(unknown))} for {cls._what} {cls.name}; "
                              f"valid: {', '.join(sorted(valid)) or 'none'}")
        try:
            return cls(**options)
        except TypeError as e:
            raise SchemeError(f"bad options for {cls._what} {cls.name}: {e}") from None

    def record(self) -> dict:
        """{"name", "options"}: what a checkpoint stores."""
        return {"name": self.name, "options": self.options()}

    def __str__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]
        return self.name + (f"({', '.join(changed)})" if changed else "")


@dataclass(frozen=True)
class Method(_Options):
    """A weight method. Subclasses set `name`, `needs`, `kinds` (scheme kinds it can produce;
    empty: every kind) and `summary`, add their options as fields, and implement `quantize`."""

    kinds: ClassVar[frozenset] = frozenset()
    registered: ClassVar[bool] = True

    def quantize(self, w: torch.Tensor, scheme: Scheme, stats: dict) -> QuantizedWeight:
        raise NotImplementedError

    def check(self, scheme: Scheme) -> None:
        """Refuse a scheme this method cannot produce."""
        if self.kinds and scheme.kind not in self.kinds:
            raise SchemeError(f"method {self.name} cannot produce scheme {scheme.name}; it takes: "
                              f"{', '.join(sorted(self.kinds))}")


@dataclass(frozen=True)
class RecordedMethod(Method):
    """A method name a checkpoint records for layers made another way (qat, qlora-merge, or a
    method this version does not have): kept so the record survives a save, never run."""

    label: str = ""
    recorded: tuple = ()  # the recorded options, as sorted (key, value) pairs
    registered: ClassVar[bool] = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def options(self) -> dict:
        return dict(self.recorded)

    def record(self) -> dict:
        return {"name": self.label, "options": self.options()}

    def __str__(self) -> str:
        return self.label

    def quantize(self, w, scheme, stats):
        raise SchemeError(f"{self.label} is recorded in this checkpoint but is not a method quantkit can run; "
                          f"valid methods: {', '.join(sorted(METHODS))}")

    def check(self, scheme):
        self.quantize(None, scheme, None)


class TransformContext(Protocol):
    """What calibration gives a transform for one block."""

    prefix: str  # the block's qualified name with a trailing dot ("model.layers.3.")
    family: Any  # arch.Family of the model
    inputs: list  # [(hidden [B, L, D], kwargs)] at the block's input

    def observe(self, collectors: dict) -> None:
        """Run the block on every input while collectors[rel] (objects with add(x)) see the
        input of the Linear `rel`."""

    def scheme_of(self, rel: str) -> "Scheme | None":
        """The scheme the block's Linear `rel` will be stored in (None: kept in float)."""


@dataclass(frozen=True)
class Transform(_Options):
    """A block transform. Subclasses set `name`, `summary`, add options as fields, implement
    `apply(block, ctx)`, which changes the float block in place and keeps its function."""

    _what: ClassVar[str] = "transform"

    def apply(self, block: torch.nn.Module, ctx: TransformContext) -> None:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}
TRANSFORMS: dict[str, type[Transform]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def register_transform(cls: type[Transform]) -> type[Transform]:
    TRANSFORMS[cls.name] = cls
    return cls


def _build(spec, registry: dict, base: type, what: str):
    if isinstance(spec, base):
        return spec
    if isinstance(spec, type) and issubclass(spec, base):
        return spec()
    options = None
    if isinstance(spec, dict):
        if set(spec) - {"name", "options"} or not isinstance(spec.get("name"), str):
            raise SchemeError(f"a {what} record is {{'name': str, 'options': dict}}, got {spec!r}")
        spec, options = spec["name"], spec.get("options") or {}
        if not isinstance(options, dict):
            raise SchemeError(f"{what} options must be a dict, got {options!r}")
    if not isinstance(spec, str) or spec not in registry:
        raise SchemeError(f"unknown {what} {spec!r}; valid: {', '.join(sorted(registry))}")
    return registry[spec].from_options(options)


def method_of(spec) -> Method:
    """A method instance from a name, a class, an instance or a {"name", "options"} record."""
    return _build(spec, METHODS, Method, "method")


def transform_of(spec) -> Transform:
    """A transform instance from a name, a class, an instance or a {"name", "options"} record."""
    return _build(spec, TRANSFORMS, Transform, "transform")


def recorded_method(spec) -> Method:
    """`method_of`, or for a name this version cannot run (a checkpoint's record), a
    RecordedMethod that keeps it."""
    name = spec.get("name") if isinstance(spec, dict) else spec
    if not isinstance(name, str) or name in METHODS:
        return method_of(spec)  # a method this version has: its options are checked, never kept unread
    try:
        return method_of(spec)
    except SchemeError:
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            opts = spec.get("options") or {}
            return RecordedMethod(spec["name"], tuple(sorted(opts.items())) if isinstance(opts, dict) else ())
        if isinstance(spec, str) and spec:
            return RecordedMethod(spec)
        raise
