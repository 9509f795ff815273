"""Weight algorithms: how quantized values are chosen. One file per method, registered here.

Each is a function `(w [out, in] float, scheme, stats) -> QuantizedWeight`. `needs` names
the statistics the pipeline must collect for it (empty for data-free methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SchemeError
from ..formats import QuantizedWeight
from ..scheme import Scheme


@dataclass(frozen=True)
class Algorithm:
    """A registered method: `fn` chooses the values, `needs` the statistics it takes, `kinds`
    the scheme kinds it can produce (empty: all)."""

    name: str
    fn: Callable[[torch.Tensor, Scheme, dict], QuantizedWeight]
    needs: frozenset = frozenset()
    kinds: frozenset = frozenset()  # scheme kinds it can produce; empty = all
    summary: str = ""

    def check(self, scheme: Scheme) -> None:
        if self.kinds and scheme.kind not in self.kinds:
            raise SchemeError(f"method {self.name} cannot produce scheme {scheme.name}; it takes: {', '.join(sorted(self.kinds))}")


ALGORITHMS: dict[str, Algorithm] = {}


def register(alg: Algorithm) -> Algorithm:
    ALGORITHMS[alg.name] = alg
    return alg


def get(name: str) -> Algorithm:
    """The method registered as `name`; SchemeError listing the valid names otherwise."""
    if name not in ALGORITHMS:
        raise SchemeError(f"unknown method {name!r}; valid: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


from . import gptq, llm_int8, rtn, rtn_mse  # noqa: E402,F401  (registration)
