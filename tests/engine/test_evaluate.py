import numpy as np
import pytest
import torch
from tiny_models import tiny_vgg_mnpo

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.evaluate import evaluate_model
from mnpo.metrics.boxes import cam_thresholds


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    write_synthetic_dataset(out=root, preset="parts", seed=4, image_size=48, num_classes=3,
                            train_per_class=1, val_per_class=1, test_per_class=4)
    return root


@pytest.mark.parametrize("method", ["mnpo", "mnpos"])
def test_uint8_views_give_the_same_evaluation_as_float_views(data, method):
    results = []
    for uint8 in (False, True):
        ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                         uint8_views=uint8)
        results.append(evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.01), method=method, batch_size=5))
    a, b = results
    assert np.array_equal(a.curves.largest, b.curves.largest) and np.array_equal(a.curves.multi, b.curves.multi)
    assert np.array_equal(a.curves.top1, b.curves.top1)
    assert (a.top1_correct, a.top5_correct, a.num_images) == (b.top1_correct, b.top5_correct, b.num_images)


def test_dataset_uint8_items(data):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 48, 48)
    assert item["ten_crop_source"].shape == (3, 55, 55) and "ten_crop" not in item
    with pytest.raises(ValueError, match="uint8_views is an 'evaluate'-mode option"):
        WSOLDataset(data / "images", data / "metadata" / "test", "train", uint8_views=True)
    with pytest.raises(ValueError, match="needs an 'evaluate'-mode data set"):
        evaluate_model(tiny_vgg_mnpo(), WSOLDataset(data / "images", data / "metadata" / "test", "localization"),
                       thresholds=cam_thresholds(0.1))


def test_channels_last_and_crop_chunks_do_not_change_the_evaluation(data):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    plain = evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.01), method="mnpo", batch_size=5)
    nhwc_model = tiny_vgg_mnpo().to(memory_format=torch.channels_last)
    nhwc = evaluate_model(nhwc_model, ds, thresholds=cam_thresholds(0.01), method="mnpo", batch_size=2,
                          channels_last=True)  # 2 images per batch: the 20 crops go through in 10 chunks
    assert (plain.top1_correct, plain.top5_correct) == (nhwc.top1_correct, nhwc.top5_correct)
    assert np.abs(plain.curves.largest - nhwc.curves.largest).sum() <= 1  # NHWC convolutions round differently
