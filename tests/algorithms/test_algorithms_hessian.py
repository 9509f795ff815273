"""HessianAccumulator: H = 2/n · XᵀX (float32 chunk products summed in float64), whatever the
batch split or input shape, within the float32 rounding its docstring states."""
import pytest
import torch

from quantkit.algorithms import hessian
from quantkit.algorithms.hessian import HessianAccumulator
from quantkit.errors import QuantkitError


def one_shot(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x.shape[0] * (x.T @ x)


def assert_close_normalized(H: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """|H_ij - ref_ij| <= tol · sqrt(ref_ii · ref_jj): the error relative to the entry's scale
    (off-diagonal entries can be near zero, so a plain relative tolerance would be meaningless)."""
    d = torch.sqrt(torch.diag(ref))
    err = float(((H - ref).abs() / (d[:, None] * d[None, :])).max())
    assert err <= tol, err


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, 24, generator=g) * torch.linspace(0.1, 5, 24)


@pytest.mark.parametrize("splits", [[300], [1, 299], [100, 100, 100], [7, 50, 3, 240], [1] * 10 + [290]])
def test_equals_one_shot_whatever_the_split(x, splits):
    acc = HessianAccumulator()
    for part in torch.split(x, splits):
        acc.add(part)
    assert acc.n == 300
    H = acc.hessian
    assert H.dtype == torch.float64 and H.shape == (24, 24)
    assert_close_normalized(H, one_shot(x))


def test_leading_dims_are_rows_and_bf16_is_accepted(x):
    x3 = x.reshape(5, 60, 24)  # [batch, seq, in] like a Linear / Conv1D input
    acc = HessianAccumulator()
    acc.add(x3[:2])
    acc.add(x3[2:])
    assert_close_normalized(acc.hessian, one_shot(x))
    xb = x.to(torch.bfloat16)
    accb = HessianAccumulator(24)
    accb.add(xb[:123])
    accb.add(xb[123:])
    assert_close_normalized(accb.hessian, one_shot(xb.double()))


def test_chunking_inside_one_large_batch(x, monkeypatch):
    monkeypatch.setattr(hessian, "CHUNK_ROWS", 16)
    acc = HessianAccumulator()
    acc.add(x)
    assert acc.n == 300
    assert_close_normalized(acc.hessian, one_shot(x))


def test_float32_chunks_stay_within_the_stated_error():
    """A full chunk of rows with a wide dynamic range and a large common offset (activations
    often have one): the float32 products lose at most ~1e-5 of each entry's scale."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * hessian.CHUNK_ROWS + 5, 48, generator=g) * torch.logspace(-2, 2, 48) + 3.0
    acc = HessianAccumulator()
    acc.add(x)
    assert_close_normalized(acc.hessian, one_shot(x))


def test_symmetric_and_positive_semidefinite(x):
    acc = HessianAccumulator()
    acc.add(x[:10])  # fewer rows than features: singular but PSD
    H = acc.hessian
    torch.testing.assert_close(H, H.T)
    ev = torch.linalg.eigvalsh(H)
    assert float(ev.min()) > -1e-7 * float(ev.max())  # PSD up to float32 rounding, far below 1% damp


def test_errors():
    acc = HessianAccumulator(8)
    with pytest.raises(QuantkitError, match="no calibration inputs"):
        acc.hessian
    with pytest.raises(QuantkitError, match="expected 8"):
        acc.add(torch.zeros(3, 9))
