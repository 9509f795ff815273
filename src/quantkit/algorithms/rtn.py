"""Round-to-nearest: each weight goes to the nearest point of the scheme's grid.

The baseline every PTQ paper compares against; data-free, works for every scheme.
"""
from ..formats import quantize
from . import Algorithm, register


def rtn(w, scheme, stats=None):
    return quantize(w, scheme)


register(Algorithm("rtn", rtn, summary="round to nearest on the scheme's grid (data-free)"))
