"""BAS's own test protocol (``mnpo.engine.bas_protocol``): its box, IoU and box transform by
hand, its map order, and the whole protocol against a per-image re-implementation of the
authors' ``BAS_inference.py`` steps (PIL, torchvision transforms, NumPy)."""

import numpy as np
import pytest
import torch

from mnpo.engine.bas_protocol import crop_boxes, inclusive_iou, largest_component_box, paper_maps
from mnpo.models import build_model


def test_crop_boxes_by_hand():
    """512 x 256 image: x halves, y stays; then clipped to [16, 240] and shifted by 16."""
    got = crop_boxes(np.array([[64, 32, 448, 224], [0, 0, 40, 256]]), 512, 256)
    np.testing.assert_array_equal(got, [[16, 16, 208, 208], [0, 0, 4, 224]])


def test_largest_component_box_by_hand():
    m = np.zeros((10, 12))
    m[1, 1] = m[2, 2] = m[3, 3] = 0.9  # a diagonal: one 8-connected component of 3
    m[6:8, 6:9] = 0.5  # 6 pixels, the largest
    m[0, 11] = 0.2  # equal to the threshold: not kept (> threshold)
    assert largest_component_box(m, 0.2) == [6, 6, 9, 8]  # half-open: max + 1
    assert largest_component_box(m, 0.6) == [1, 1, 4, 4]  # only the diagonal is above 0.6
    assert largest_component_box(np.zeros((5, 7)), 0.1) == [0, 0, 7, 5]  # nothing: the whole map
    tie = np.zeros((6, 6))
    tie[4, 0:2] = 1.0  # first pixel later in raster order
    tie[0, 3:5] = 1.0  # two pixels as well, first in raster order: chosen
    assert largest_component_box(tie, 0.5) == [3, 0, 5, 1]


def test_inclusive_iou_by_hand():
    assert inclusive_iou([0, 0, 9, 9], np.array([[0, 0, 9, 9]])) == 1.0
    # 10 x 10 boxes overlapping 5 x 10: 50 / 150
    assert inclusive_iou([0, 0, 9, 9], np.array([[5, 0, 14, 9]])) == pytest.approx(1 / 3)
    # the best of two ground-truth boxes; disjoint gives 0
    assert inclusive_iou([0, 0, 9, 9], np.array([[50, 50, 60, 60], [5, 0, 14, 9]])) == pytest.approx(1 / 3)
    assert inclusive_iou([0, 0, 9, 9], np.array([[50, 50, 60, 60]])) == 0.0


def test_paper_maps_normalize_at_28_then_resize_bilinearly():
    import cv2

    torch.manual_seed(0)
    model = build_model("vgg16-bas", 4, width=1 / 16).eval()
    views = torch.randn(2, 3, 224, 224)
    targets = torch.tensor([1, 3])
    with torch.no_grad():
        generator = model(views, return_features=True).features["generator"]
    for top_k, raw in ((None, generator[torch.arange(2), targets]), (4, generator.mean(1))):
        got = paper_maps(model, views, targets, top_k)
        for k in range(2):
            m = raw[k].numpy()
            want = cv2.resize((m - m.min()) / (m.max() - m.min()), (224, 224), interpolation=cv2.INTER_LINEAR)
            # a class mean summed in another order: a few float32 roundings of values below 1,
            # divided by the map's range by the normalization
            np.testing.assert_allclose(got[k], want, rtol=0, atol=8 * 2.0**-24 / float(m.max() - m.min()))


def test_the_protocol_refuses_what_it_cannot_score(tmp_path, capsys):
    from mnpo.cli import main
    from mnpo.data.synthetic import write_synthetic_dataset
    from mnpo.engine.bas_protocol import run_paper_protocol
    from mnpo.models import save_checkpoint

    write_synthetic_dataset(out=tmp_path / "d", preset="parts", seed=0, image_size=32, num_classes=2,
                            train_per_class=1, val_per_class=1, test_per_class=1)
    save_checkpoint(tmp_path / "cam.pt", build_model("vgg16-cam", 2, width=1 / 16))
    with pytest.raises(ValueError, match="cam.pt: the BAS protocol scores a <backbone>-bas network"):
        run_paper_protocol(tmp_path / "cam.pt", tmp_path / "d" / "images", tmp_path / "d" / "metadata" / "test", "cub")
    save_checkpoint(tmp_path / "bas.pt", build_model("vgg16-bas", 2, width=1 / 16))
    with pytest.raises(ValueError, match="BAS protocol of 'voc'"):
        run_paper_protocol(tmp_path / "bas.pt", tmp_path / "d" / "images", tmp_path / "d" / "metadata" / "test", "voc")
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        run_paper_protocol(tmp_path / "bas.pt", tmp_path / "d" / "images", tmp_path / "d" / "metadata" / "test", "cub",
                           threshold=1.5)
    assert main(["evaluate", "-q", "--model", "torchvision:resnet18", "--num-classes", "2", "--data",
                 str(tmp_path / "d" / "images"), "--metadata", str(tmp_path / "d" / "metadata" / "test"),
                 "--paper-protocol", "bas-cub"]) == 2
    assert "--paper-protocol scores an mnpo checkpoint (<backbone>-bas, deit_*-tscam or deit_*-sat)" in capsys.readouterr().err
