"""``channel_weighted_sum``: the channel sum every CAM-like map ends in."""

import math

import numpy as np
import pytest
import torch

from reference import naive_normalization

from mnpo.maps.postprocess import channel_weighted_mean, channel_weighted_sum


@pytest.mark.parametrize("channels", [3, 512, 2048])
def test_channel_weighted_sum_is_the_float64_sum_within_summation_rounding(channels):
    """Against the float64 sum of the same float32 terms: each pixel's error is at most
    ``(ceil(log2 C) + 1) u sum_c |w_c F_c|`` (one rounding per product, one per level of a
    pairwise sum; a plain left-to-right sum is allowed ``C u``). Non-negative features and
    mixed-sign weights, as after a ReLU. Catches a wrong axis, a missing channel or a
    broadcast over the wrong dimension, all far beyond the bound."""
    g = torch.Generator().manual_seed(channels)
    features = torch.rand(2, channels, 7, 5, generator=g)
    weights = torch.randn(2, channels, generator=g)
    terms = weights.double()[:, :, None, None] * features.double()
    got = channel_weighted_sum(weights, features)
    assert got.shape == (2, 7, 5) and got.dtype == torch.float32
    bound = (math.ceil(math.log2(channels)) + 1) * 2.0**-24 * terms.abs().sum(1)
    assert ((got.double() - terms.sum(1)).abs() <= bound).all()
    mean = channel_weighted_mean(weights, features)
    assert ((mean.double() - terms.sum(1) / channels).abs() <= bound / channels * (1 + 2.0**-23)).all()


def test_channel_weighted_sum_keeps_float64():
    g = torch.Generator().manual_seed(0)  # positive terms: relative error at most 4 u for 4 channels
    weights = torch.rand(1, 4, dtype=torch.float64, generator=g)
    features = torch.rand(1, 4, 3, 3, dtype=torch.float64, generator=g)
    expected = sum(weights[0, c] * features[0, c] for c in range(4))
    torch.testing.assert_close(channel_weighted_sum(weights, features)[0], expected, rtol=4 * 2.0**-53, atol=0)


def normalization_cases():
    """Random maps, one of mixed sign, ties at the percentile, a constant map, a NaN, an
    infinity, an all-negative map, and maps whose divisor is 0 for pas / ivr."""
    g = np.random.default_rng(0)
    cases = [g.normal(size=(6, 5)), g.normal(size=(6, 5)) - 1.0, np.round(g.uniform(0, 3, (6, 5))),
             np.full((6, 5), 0.7)]
    nan = g.normal(size=(6, 5))
    nan[2, 3] = np.nan
    inf = g.normal(size=(6, 5))
    inf[0, 0] = np.inf
    negative = -g.uniform(0.1, 1.0, (6, 5))
    mostly_low = np.zeros((6, 5))
    mostly_low[0, :2] = [1.0, 2.0]  # 28 of 30 at the minimum: PaS's 90 % value is the minimum
    mostly_high = np.ones((6, 5))
    mostly_high[0, :3] = [0.0, 0.2, 0.5]  # IVR's 45 % value is the maximum
    return np.stack(cases + [nan, inf, negative, mostly_low, mostly_high])


@pytest.mark.parametrize("mode", ["minmax", "max", "pas", "ivr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_normalization_equals_the_naive_per_map_definition(mode, dtype):
    from mnpo.maps.postprocess import normalize_maps

    cases = normalization_cases()
    got = normalize_maps(torch.as_tensor(cases, dtype=dtype), mode).double().numpy()
    wanted = np.stack([naive_normalization(c.astype(np.float32) if dtype == torch.float32 else c, mode)
                       for c in cases])
    # float32: one subtraction and one division of values <= ~4, each rounded once: 2 eps of 1
    tol = 0 if dtype == torch.float64 else 2 * float(torch.finfo(torch.float32).eps)
    np.testing.assert_allclose(got, wanted, rtol=0, atol=tol)
    assert (got[3:6] == 0).all()  # constant, NaN, infinity
    assert got.min() >= 0 and got.max() <= 1


def test_normalizations_by_hand():
    from mnpo.maps.postprocess import normalize_maps

    s = torch.tensor([[[-2.0, 0.0, 1.0, 3.0, 4.0, 2.0, 1.0, 0.0, -1.0, 2.0]]], dtype=torch.float64)
    # sorted: -2 -1 0 0 1 1 2 2 3 4; minmax: (s + 2) / 6
    assert normalize_maps(s, "minmax")[0, 0].tolist() == pytest.approx([0, 2 / 6, 3 / 6, 5 / 6, 1, 4 / 6, 3 / 6,
                                                                        2 / 6, 1 / 6, 4 / 6], abs=1e-15)
    assert normalize_maps(s, "max")[0, 0].tolist() == [0, 0, 0.25, 0.75, 1, 0.5, 0.25, 0, 0, 0.5]
    # pas: s + 2 divided by its value at index int(10 * 0.9) = 9 of the sorted shifted copy, 6
    assert normalize_maps(s, "pas")[0, 0].tolist() == pytest.approx((s[0, 0] + 2).div(6).tolist(), abs=1e-15)
    # ivr at 0.45: the value at index int(4.5) = 4 of the sort, 1; max(0, s - 1) / 3
    assert normalize_maps(s, "ivr")[0, 0].tolist() == pytest.approx([0, 0, 0, 2 / 3, 1, 1 / 3, 0, 0, 0, 1 / 3],
                                                                     abs=1e-15)
    # ivr at 0.8: index 8, the value 3; only the maximum is left
    assert normalize_maps(s, "ivr", percentile=0.8)[0, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    # pas clips at 1 what lies above the 90 % value: index 9 of 20 values [0..19] is 18
    ramp = torch.arange(20, dtype=torch.float64).view(1, 4, 5)
    assert normalize_maps(ramp, "pas").flatten().tolist()[-2:] == [1.0, 1.0]
    assert normalize_maps(ramp, "pas").flatten()[17] == 17 / 18


@pytest.mark.parametrize("call, message", [
    (lambda m: normalize(m, "zscore"), "unknown normalization 'zscore'"),
    (lambda m: normalize(m, "ivr", percentile=1.0), r"percentile must be a number in \[0, 1\), got 1.0"),
    (lambda m: normalize(m, "ivr", percentile=True), "got True"),
    (lambda m: normalize(m[0]), r"maps must be \(B, H, W\)"),
])
def test_normalization_refuses_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.rand(2, 4, 4))


def normalize(*args, **kwargs):
    from mnpo.maps.postprocess import normalize_maps

    return normalize_maps(*args, **kwargs)
