"""Observers on distributions whose right answer is known (or computed independently here)."""
import math

import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.observers import OBSERVERS, make_observer, qparams_from_range


def gaussian_with_outliers(n=200_000, outliers=(200.0, -150.0, 180.0, 300.0, -250.0), seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[: len(outliers)] = torch.tensor(outliers)
    return x


def observe(name, x, chunks=10, **kw):
    o = make_observer(name, **kw)
    for c in x.chunk(chunks):
        o.update(c)
    return o


def true_mse(x, lo, hi, bits, symmetric):
    """Actual squared error of quantizing x to the grid of [lo, hi] (independent of the observers)."""
    s, z = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        q = torch.round(x / s).clamp(-m, m)
        return float(((q * s - x) ** 2).mean())
    q = (torch.round(x / s) + z).clamp(0, 2**bits - 1)
    return float((((q - z) * s - x) ** 2).mean())


@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_keeps_every_outlier(symmetric):
    lo, hi = observe("minmax", gaussian_with_outliers(), symmetric=symmetric).range()
    assert (float(lo), float(hi)) == (-250.0, 300.0)


def test_ema_is_the_running_average_of_batch_ranges():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0]), torch.tensor([-5.0, 1.0])]
    o = make_observer("ema", momentum=0.25)
    for b in batches:
        o.update(b)
    lo, hi = o.range()
    # first batch sets it, then r <- 0.75 r + 0.25 r_batch
    exp_lo = (-1.0 * 0.75 + -3.0 * 0.25) * 0.75 + -5.0 * 0.25
    exp_hi = (2.0 * 0.75 + 4.0 * 0.25) * 0.75 + 1.0 * 0.25
    assert float(lo) == pytest.approx(exp_lo) and float(hi) == pytest.approx(exp_hi)


def test_percentile_ignores_outliers_and_hits_the_gaussian_quantile():
    lo, hi = observe("percentile", gaussian_with_outliers(), percentile=99.9).range()
    # P(|x| <= 3.2905) = 0.999 for a standard normal; the bin width here is 600/65536
    assert float(hi) == pytest.approx(3.2905, abs=0.05) and float(lo) == -float(hi)
    lo, hi = observe("percentile", gaussian_with_outliers(), percentile=99.9, symmetric=False).range()
    assert float(lo) == pytest.approx(-3.0902, abs=0.06) and float(hi) == pytest.approx(3.0902, abs=0.06)


def test_mse_4bit_ignores_outliers_and_finds_the_optimal_gaussian_clip():
    x = gaussian_with_outliers()
    lo, hi = observe("mse", x, bits=4).range()
    # brute force over thresholds on the data itself: the observer's pick is as good as the best
    ts = torch.linspace(1.5, 4.0, 101)
    errs = [true_mse(x, -float(t), float(t), 4, True) for t in ts]
    best = min(errs)
    assert float(hi) < 4.0  # the outliers (150..300) are clipped, not covered
    assert true_mse(x, float(lo), float(hi), 4, True) <= best * 1.02
    assert float(ts[int(torch.tensor(errs).argmin())]) == pytest.approx(float(hi), abs=0.15)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_8bit_range_is_near_the_true_minimum(symmetric):
    x = gaussian_with_outliers()
    lo, hi = observe("mse", x, symmetric=symmetric).range()
    mine = true_mse(x, float(lo), float(hi), 8, symmetric)
    assert mine < true_mse(x, -250.0, 300.0, 8, symmetric)  # better than covering everything (min-max)
    assert mine < true_mse(x, -3.9, 3.9, 8, symmetric)  # and better than clipping every outlier away
    if symmetric:  # brute force over every threshold: within 2% of the best achievable
        best = min(true_mse(x, -t, t, 8, True) for t in torch.linspace(1, 300, 600).tolist())
        assert mine <= best * 1.02


@pytest.mark.parametrize("symmetric", [True, False])
def test_entropy_ignores_outliers(symmetric):
    lo, hi = observe("entropy", gaussian_with_outliers(), symmetric=symmetric).range()
    assert 2.5 < float(hi) < 8 and -8 < float(lo) < -2.5


def test_entropy_keeps_a_range_that_holds_the_data():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1  # uniform: nothing to clip
    lo, hi = observe("entropy", x).range()
    assert float(hi) > 0.97


def test_per_channel_ranges():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 1000, generator=g) * torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    for name in OBSERVERS:
        lo, hi = observe(name, w, chunks=1, axis=0).range()
        assert lo.shape == hi.shape == (4,)
        assert bool((hi[1:] > hi[:-1]).all()), name  # the wider channels get the wider ranges
    lo, hi = observe("minmax", w, chunks=1, axis=0).range()
    assert torch.equal(hi, w.amax(1)) and torch.equal(lo, w.amin(1))
    # activations: features on the last axis
    a = torch.randn(8, 16, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    lo, hi = observe("minmax", a, chunks=1, axis=-1).range()
    assert torch.equal(hi, a.reshape(-1, 4).amax(0))


def test_histogram_growth_is_exact():
    """R doubles and bin pairs merge: the same histogram whatever the batch order."""
    x = gaussian_with_outliers(n=10_000)
    a = observe("percentile", x, chunks=1, bins=1024)
    b = make_observer("percentile", bins=1024)
    for c in reversed(x.chunk(7)):
        b.update(c)
    if float(a.R) == float(b.R):
        assert torch.equal(a.hist, b.hist)
    assert float(a.hist.sum()) == float(b.hist.sum()) == 10_000


def test_qparams_conventions():
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.54), 8, True)
    assert float(s) == pytest.approx(2.54 / 127) and z is None
    s, z = qparams_from_range(torch.tensor(0.5), torch.tensor(2.55), 8, False)  # widened to include 0
    assert float(s) == pytest.approx(0.01) and int(z) == 0
    s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.55), 8, False)
    assert float(s) == pytest.approx(0.01) and int(z) == 100


def test_reproducible_and_errors():
    x = gaussian_with_outliers()
    for name in OBSERVERS:
        assert [float(v) for v in observe(name, x).range()] == [float(v) for v in observe(name, x).range()]
    with pytest.raises(SchemeError, match="unknown observer"):
        make_observer("kl")
    with pytest.raises(SchemeError, match="seen no data"):
        make_observer("mse").range()
    with pytest.raises(SchemeError, match="2..8 bits"):
        make_observer("minmax", bits=16)
    assert math.isfinite(float(observe("mse", torch.zeros(100)).qparams()[0]))
