"""``channel_weighted_sum``: the channel sum every CAM-like map ends in."""

import math

import pytest
import torch

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
