"""HessianAccumulator: H = 2/n · XᵀX in float64, whatever the batch split or input shape."""
import pytest
import torch

from quantkit.algorithms import hessian
from quantkit.algorithms.hessian import HessianAccumulator
from quantkit.errors import QuantkitError


def one_shot(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x.shape[0] * (x.T @ x)


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
    torch.testing.assert_close(H, one_shot(x), rtol=1e-12, atol=1e-12)


def test_leading_dims_are_rows_and_bf16_is_accepted(x):
    x3 = x.reshape(5, 60, 24)  # [batch, seq, in] like a Linear / Conv1D input
    acc = HessianAccumulator()
    acc.add(x3[:2])
    acc.add(x3[2:])
    torch.testing.assert_close(acc.hessian, one_shot(x), rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    accb = HessianAccumulator(24)
    accb.add(xb[:123])
    accb.add(xb[123:])
    torch.testing.assert_close(accb.hessian, one_shot(xb.double()), rtol=1e-12, atol=1e-12)


def test_chunking_inside_one_large_batch(x, monkeypatch):
    monkeypatch.setattr(hessian, "CHUNK_ROWS", 16)
    acc = HessianAccumulator()
    acc.add(x)
    assert acc.n == 300
    torch.testing.assert_close(acc.hessian, one_shot(x), rtol=1e-12, atol=1e-12)


def test_symmetric_and_positive_semidefinite(x):
    acc = HessianAccumulator()
    acc.add(x[:10])  # fewer rows than features: singular but PSD
    H = acc.hessian
    torch.testing.assert_close(H, H.T)
    assert float(torch.linalg.eigvalsh(H).min()) > -1e-10


def test_errors():
    acc = HessianAccumulator(8)
    with pytest.raises(QuantkitError, match="no calibration inputs"):
        acc.hessian
    with pytest.raises(QuantkitError, match="expected 8"):
        acc.add(torch.zeros(3, 9))
