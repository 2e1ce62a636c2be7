"""The protocol's views (``mnpo.engine.views``): resize side, ten-crop logits, boxes back to the image."""

import pytest
import torch

from mnpo.engine.views import box_to_image, resize_for, ten_crop_logits
from mnpo.models.multibranch import MultiBranchOutput


def test_resize_for_is_256_for_224_and_in_proportion():
    # 256 / 224 = 8 / 7: 224 -> 256, 112 -> 128, 448 -> 512; 100 -> 114.29 -> 114; 49 -> 56.
    assert [resize_for(s) for s in (224, 112, 448, 100, 49)] == [256, 128, 512, 114, 56]


class PerCropScores(torch.nn.Module):
    """Logits that depend on the crop only (its mean and its first pixel), so a chunked pass
    that mixed, dropped or reordered crops would give other numbers."""

    def forward(self, x):
        self.batches = getattr(self, "batches", []) + [len(x)]
        return MultiBranchOutput(logits=[torch.stack([x.mean((1, 2, 3)), x[:, 0, 0, 0]], 1)])


@pytest.mark.parametrize("chunk, batches", [(1, [1] * 30), (7, [7, 7, 7, 7, 2]), (64, [30])])
def test_ten_crop_logits_in_chunks_are_each_crops_logits(chunk, batches):
    crops = torch.randn(3, 10, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = PerCropScores()
    logits = ten_crop_logits(model, crops, chunk)
    assert logits.shape == (3, 10, 2) and model.batches == batches
    # a mean of 192 float64 values of size ~1, summed in another order at most: ~1e-14
    torch.testing.assert_close(logits[..., 0], crops.mean((2, 3, 4)), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[..., 1], crops[:, :, 0, 0, 0], rtol=0, atol=0)


def test_box_to_image_by_hand():
    # x0: 0 -> 0; x1 = 223 covers [446, 448) -> 447 (the last column); y0: 10 * 100 / 224 = 4.46 -> 4;
    # y1 = 111 ends at 112 * 100 / 224 = 50 -> 49.
    assert box_to_image([0, 10, 223, 111], 448, 100) == (0, 4, 447, 49)
    # The full frame maps onto the full image.
    assert box_to_image([0, 0, 223, 223], 448, 100) == (0, 0, 447, 99)
    # Shrinking: 112 * 10 / 224 = 5; 224 * 10 / 224 - 1 = 9 (the last column).
    assert box_to_image([112, 0, 223, 223], 10, 5) == (5, 0, 9, 4)
    # One frame pixel shrunk below one image pixel keeps a one-pixel box.
    assert box_to_image([100, 100, 100, 100], 10, 10) == (4, 4, 4, 4)
    # Clipped to the image when a coordinate would fall beyond it.
    assert box_to_image([0, 0, 224, 224], 7, 3) == (0, 0, 6, 2)
