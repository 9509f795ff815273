"""Round-to-nearest: each weight goes to the nearest point of the scheme's grid.

The baseline every PTQ paper compares against; data-free, works for every scheme.
"""
from dataclasses import dataclass

from ..formats import quantize
from .base import Method, register_method


@register_method
@dataclass(frozen=True)
class RTN(Method):
    """Round to nearest on the scheme's grid: `qk.quantize(model, "int4-g128", method=qk.RTN())`."""

    name = "rtn"
    summary = "round to nearest on the scheme's grid (data-free)"

    def quantize(self, w, scheme, stats=None):
        return quantize(w, scheme)
