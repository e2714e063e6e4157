"""Otsu's threshold (osslbench.ood.otsu_threshold) against a brute-force maximiser of the between-class variance."""

from __future__ import annotations

import pytest
import torch

from osslbench.ood import otsu_threshold


def between(scores: torch.Tensor, upper: torch.Tensor) -> float:
    """Between-class variance ``w0 * w1 * (m0 - m1)^2`` (class weights as fractions) of the split ``upper``."""
    s = scores.double()
    w1 = upper.double().mean()
    w0 = 1 - w1
    return float(w0 * w1 * (s[~upper].mean() - s[upper].mean()) ** 2)


def brute_force(scores: torch.Tensor) -> torch.Tensor:
    """The upper class of the best of ALL splits of the sorted scores (between distinct values; first maximiser)."""
    values = scores.double().unique()  # sorted
    best, best_upper = -1.0, None
    for cut in values[:-1]:
        upper = scores.double() > cut
        v = between(scores, upper)
        if v > best:
            best, best_upper = v, upper
    assert best_upper is not None
    return best_upper


def bins_of(scores: torch.Tensor, bins: int) -> torch.Tensor:
    s = scores.double()
    return ((s - s.min()) / (s.max() - s.min()) * bins).floor().long().clamp(0, bins - 1)


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force_when_every_score_has_its_own_bin(seed):
    g = torch.Generator().manual_seed(seed)
    n = [7, 20, 50, 33, 64, 12][seed]
    # a mixture, so that the optimum is not always near the middle
    scores = torch.cat([torch.rand(n, generator=g) * 0.6, 0.5 + torch.rand(n // 2 + 1, generator=g) * 0.5]).double()
    scores = scores[torch.randperm(len(scores), generator=g)]
    bins = 1 << 20
    assert bins_of(scores, bins).unique().numel() == len(scores)  # the precondition of exactness
    t = otsu_threshold(scores, bins=bins)
    expected = brute_force(scores)
    assert torch.equal(scores > t, expected)
    # the threshold lies midway between the two classes
    assert t == pytest.approx(float((scores[~expected].max() + scores[expected].min()) / 2), abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_default_bins_maximise_over_the_splits_between_bins(seed):
    """With 256 bins (scikit-image's default) the split is the best of the splits between bins; its
    between-class variance is that of the best split of all within the binning's resolution."""
    g = torch.Generator().manual_seed(100 + seed)
    scores = torch.cat([torch.randn(300, generator=g) * 0.1 + 0.3, torch.randn(200, generator=g) * 0.05 + 0.8])
    t = otsu_threshold(scores)
    upper = scores.double() > t
    which = bins_of(scores, 256)
    assert not (which[upper].min() <= which[~upper].max())  # the split falls between two bins
    candidates = [between(scores, which > k) for k in range(255) if 0 < int((which > k).sum()) < len(scores)]
    assert between(scores, upper) == pytest.approx(max(candidates), rel=1e-12)
    assert between(scores, upper) <= between(scores, brute_force(scores)) + 1e-15


def test_bimodal_set_is_split_exactly_between_the_modes():
    g = torch.Generator().manual_seed(7)
    low = 0.10 + 0.05 * torch.rand(30, generator=g)
    high = 0.85 + 0.05 * torch.rand(70, generator=g)
    scores = torch.cat([low, high])
    perm = torch.randperm(100, generator=g)
    scores, is_high = scores[perm], (torch.arange(100) >= 30)[perm]
    t = otsu_threshold(scores)
    assert torch.equal(scores > t, is_high)
    assert t == pytest.approx((float(low.max()) + float(high.min())) / 2, abs=1e-12)
    assert otsu_threshold(torch.tensor([0.0, 1.0])) == 0.5
    assert otsu_threshold(scores.view(10, 10)) == t  # any shape, flattened


def test_split_is_exact_in_float64_for_neighbouring_float32_scores():
    """Saturated sigmoid scores: 1.0 and its float32 neighbour below. The float64 threshold sits between them;
    comparing in float64 (as T2T's selection does) keeps the chosen split, a float32 comparison would not."""
    below_one = torch.tensor(1.0).nextafter(torch.tensor(0.0))
    scores = torch.stack([below_one, below_one, torch.tensor(1.0), torch.tensor(1.0)])
    t = otsu_threshold(scores)
    assert float(below_one) < t < 1.0
    assert (scores.double() > t).tolist() == [False, False, True, True]


def test_constant_input_selects_nothing():
    for scores in (torch.full((5,), 0.3), torch.tensor([2.5]), torch.zeros(3, 2)):
        t = otsu_threshold(scores)
        assert t == float(scores.flatten()[0].double())
        assert not (scores.double() > t).any()


@pytest.mark.parametrize("bad", [torch.empty(0), torch.tensor([0.1, float("nan")]), torch.tensor([float("inf"), 0.2]),
                                 torch.tensor([-float("inf")])])
def test_empty_or_non_finite_input_is_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        otsu_threshold(bad)


def test_bins_below_two_are_refused():
    with pytest.raises(ValueError, match="bins"):
        otsu_threshold(torch.tensor([0.0, 1.0]), bins=1)
