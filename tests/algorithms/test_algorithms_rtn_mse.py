"""rtn-mse: never worse than RTN per group, better on heavy-tailed rows, stored as RTN stores,
and the same choice as a slow search written group by group."""
import pytest
import torch

from quantkit.algorithms import method_of
from quantkit.errors import SchemeError
from quantkit.formats import quantize
from quantkit.scheme import parse_scheme

SCHEMES = ["int4-g32", "int4-g32-sym", "int3-g64", "int2-g32", "int4", "int8", "int6-tensor-asym"]


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g)
    w[torch.rand(48, 256, generator=g) < 0.01] *= 8.0  # a few outliers per row
    return w


def group_err(w, qw, L):
    return (w - qw.dequantize()).pow(2).reshape(w.shape[0], -1, L).sum(-1)


@pytest.mark.parametrize("name", SCHEMES)
def test_never_worse_than_rtn_and_better_overall(name):
    w, sc = weights(), parse_scheme(name)
    m, r = method_of("rtn-mse").quantize(w, sc, {}), quantize(w, sc)
    L = w.shape[1] if not sc.grouped else sc.group_size
    if sc.group_size == 0:
        assert float((w - m.dequantize()).pow(2).sum()) <= float((w - r.dequantize()).pow(2).sum())
    else:
        assert (group_err(w, m, L) <= group_err(w, r, L) + 1e-9).all()
    if sc.bits < 8:  # at 8 bits the grid is fine enough that clipping buys little
        assert float((w - m.dequantize()).pow(2).sum()) < 0.99 * float((w - r.dequantize()).pow(2).sum())
    assert m.tensors.keys() == r.tensors.keys() and m.nbytes == r.nbytes
    for k in r.tensors:
        assert m.tensors[k].dtype == r.tensors[k].dtype and m.tensors[k].shape == r.tensors[k].shape


def _slow(w, bits, L):
    """Symmetric groups, one at a time: for each ratio, the fp16 scale (rounded up) and codes; keep the best."""
    from gptq_reference import _fp16_up

    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(0, w.shape[1], L):
            g = w[i, j:j + L].double()
            best = None
            for k in range(11):
                s = float(_fp16_up(torch.tensor([float(g.abs().max()) * (1.0 - 0.05 * k) / qmax]))[0])
                d = torch.clamp(torch.round(g / s), -qmax, qmax) * s
                e = float((d - g).pow(2).sum())
                if best is None or e < best[0]:
                    best = (e, d)
            out[i, j:j + L] = best[1].float()
    return out


def test_matches_a_slow_group_by_group_search():
    w = weights(1)[:8, :128]
    m = method_of("rtn-mse").quantize(w, parse_scheme("int4-g32-sym"), {})
    slow = _slow(w, 4, 32)
    assert float((m.dequantize() - slow).abs().max()) < 1e-2 * float(w.abs().max())
    assert float((m.dequantize() == slow).float().mean()) > 0.98


def test_only_integer_schemes():
    with pytest.raises(SchemeError):
        method_of("rtn-mse").check(parse_scheme("nf4"))
