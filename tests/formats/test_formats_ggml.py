"""GGML block codecs against the `gguf` package (llama.cpp's reference codecs in Python)."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from quantkit.errors import SchemeError  # noqa: E402
from quantkit.formats.ggml import GGML_TYPES, LINEAR_GRIDS, dequantize_rows, quantize_rows  # noqa: E402

import quantkit.formats  # noqa: E402,F401  (every GGML type registers itself)

ALL_TYPES = sorted(GGML_TYPES)  # every registered type is tested: a new one needs no new test
SUPER_BLOCK = 256  # K-quants


def _gguf_quantizes(name: str) -> bool:
    """Does the `gguf` package have a quantizer for this type (it has for the legacy ones)?"""
    try:
        gguf.quants.quantize(np.zeros((1, SUPER_BLOCK), dtype=np.float32), T[name])
    except NotImplementedError:
        return False
    return True


LEGACY = [n for n in ALL_TYPES if _gguf_quantizes(n)]
K_TYPES = [n for n in ALL_TYPES if n not in LEGACY]  # compared through gguf's dequantizer


def _inputs():
    g = torch.Generator().manual_seed(0)
    tie = torch.zeros(2, 32)
    tie[0, 3], tie[0, 9] = 0.5, -0.5  # equal magnitudes: the first one sets the sign (as numpy's argmax)
    tie[1, 3], tie[1, 9] = -0.5, 0.5
    return {
        "gauss": torch.randn(64, 256, generator=g),
        "tiny": torch.randn(8, 64, generator=g) * 1e-6,
        "zeros": torch.zeros(4, 32),
        "integers": torch.randn(3, 96, generator=g).mul(4).round(),
        "positive": torch.rand(5, 64, generator=g) + 1.0,
        "large": torch.randn(2, 64, generator=g) * 1e4,
        "ties": tie,
    }


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("case", list(_inputs()))
def test_legacy_bytes_equal_gguf_reference(name, case):
    w = _inputs()[case]
    ref = gguf.quants.quantize(w.numpy(), T[name]).view(np.uint8).reshape(w.shape[0], -1)
    ours = quantize_rows(w, name).numpy()
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_every_gguf_type_quantkit_names_is_registered():
    from quantkit.scheme import GGUF_TYPES

    assert set(GGUF_TYPES) <= set(GGML_TYPES) and len(LEGACY) >= 8 and len(K_TYPES) >= 6


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_equals_gguf_reference(name):
    w = _inputs()["gauss"]
    b = quantize_rows(w, name)
    ref = gguf.quants.dequantize(b.numpy(), T[name])
    assert np.array_equal(dequantize_rows(b, name).numpy(), ref)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quants_zero_rows_and_sizes(name):
    t = GGML_TYPES[name]
    z = torch.zeros(3, 512)
    b = quantize_rows(z, name)
    assert b.shape == (3, 512 // t.block * t.nbytes)
    assert b.shape[1] == gguf.GGML_QUANT_SIZES[T[name]][1] * 512 // gguf.GGML_QUANT_SIZES[T[name]][0]
    assert torch.equal(dequantize_rows(b, name), z)


def test_error_falls_with_bits():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))

    def rel(name):
        d = dequantize_rows(quantize_rows(w, name), name)
        return float(((d - w) ** 2).sum() / (w**2).sum())

    errs = [rel(n) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert errs == sorted(errs, reverse=True), errs
    assert rel("Q4_K") < rel("Q4_0")  # sub-block scales + mins beat one absmax per 32
    assert rel("IQ4_NL") < rel("Q4_0")  # non-uniform levels fit Gaussian weights better


def test_q4_0_hand_worked_block():
    # values -8..7 then zeros: the largest magnitude is -8, so d = -8/-8 = 1 and q = x + 8
    x = torch.cat([torch.arange(-8.0, 8.0), torch.zeros(16)]).reshape(1, 32)
    b = quantize_rows(x, "Q4_0")[0]
    assert b[:2].view(torch.float16).item() == 1.0
    codes = torch.cat([b[2:] & 0x0F, b[2:] >> 4]).tolist()
    assert codes == list(range(16)) + [8] * 16
    assert torch.equal(dequantize_rows(b.reshape(1, -1), "Q4_0"), x)


def test_q8_0_rounds_halves_away_from_zero():
    # absmax 127 -> d = 1, so codes are round(x): 2.5 -> 3, -2.5 -> -3 (C roundf), not banker's 2/-2
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5])
    q = quantize_rows(x, "Q8_0")[0, 2:].view(torch.int8)
    assert q[:4].tolist() == [127, 3, -3, 1]


def test_linear_grid_encode_decode_round_trip():
    g = LINEAR_GRIDS["Q5_1"]
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(2))
    d, m = g.choose(x)
    q = g.encode(x, d[:, None], m[:, None])
    assert int(q.min()) >= g.qmin and int(q.max()) <= g.qmax
    q2, d2, m2 = g.unpack(g.pack_dm(q, d, m))
    assert torch.equal(q2, q)
    assert torch.equal(d2, d.half().float()) and torch.equal(m2, m.half().float())
    # inside the range the error is at most half a step (plus the float16 rounding of d and m)
    err = (d2[:, None] * q2 + m2[:, None] - x).abs()
    assert bool((err <= d2[:, None] * 0.5 + 1e-2 * d2[:, None] + 1e-3).all())


def test_rows_that_do_not_divide_are_refused():
    with pytest.raises(SchemeError, match="multiple of 256"):
        quantize_rows(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(SchemeError, match="unknown GGUF tensor type"):
        quantize_rows(torch.zeros(2, 64), "Q7_0")
