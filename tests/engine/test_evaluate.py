import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_vgg_mnpo

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.evaluate import EvalSettings, evaluate_batch, evaluate_model
from mnpo.metrics.boxes import cam_thresholds


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    write_synthetic_dataset(out=root, preset="parts", seed=4, image_size=48, num_classes=3,
                            train_per_class=1, val_per_class=1, test_per_class=4)
    return root


@pytest.mark.numerics
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


@pytest.mark.numerics
def test_channels_last_and_crop_chunks_do_not_change_the_evaluation(data):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    plain = evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.01), method="mnpo", batch_size=5)
    nhwc_model = tiny_vgg_mnpo().to(memory_format=torch.channels_last)
    nhwc = evaluate_model(nhwc_model, ds, thresholds=cam_thresholds(0.01), method="mnpo", batch_size=2,
                          channels_last=True)  # 2 images per batch: the 20 crops go through in 10 chunks
    assert (plain.top1_correct, plain.top5_correct) == (nhwc.top1_correct, nhwc.top5_correct)
    assert np.abs(plain.curves.largest - nhwc.curves.largest).sum() <= 1  # NHWC convolutions round differently


class Stop(Exception):
    pass


@pytest.fixture
def data_with_a_bad_image(data, tmp_path):
    import shutil

    root = tmp_path / "ev"
    shutil.copytree(data, root)
    ds = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate")
    (root / "images" / ds.image_ids[4]).write_bytes(b"not an image")
    return root


def _same(a, b):
    assert np.array_equal(a.curves.largest, b.curves.largest) and np.array_equal(a.curves.multi, b.curves.multi)
    assert np.array_equal(a.curves.top1, b.curves.top1) and np.array_equal(a.curves.top5, b.curves.top5)
    assert (a.num_images, a.top1_correct, a.top5_correct, a.skipped) == \
        (b.num_images, b.top1_correct, b.top5_correct, b.skipped)


@pytest.mark.numerics
def test_an_interrupted_evaluation_continues_to_the_uninterrupted_result(data_with_a_bad_image, tmp_path):
    root = data_with_a_bad_image
    ds = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    common = dict(thresholds=cam_thresholds(0.01), method="mnpos", batch_size=3)
    whole = evaluate_model(tiny_vgg_mnpo(), ds, **common)
    assert whole.num_images == 11 and len(whole.skipped) == 1
    state = tmp_path / "state.json"
    batches = []

    def stop_at_third(batch, maps):
        batches.append(list(batch["image_id"]))
        if len(batches) == 3:
            raise Stop

    with pytest.raises(Stop):
        evaluate_model(tiny_vgg_mnpo(), ds, **common, state_file=state, save_every=0, on_batch=stop_at_third)
    done = json.loads(state.read_text())
    assert done["evaluator"]["n"] == 5 and done["skipped"] == [ds.image_ids[4]]  # two batches saved, the bad image listed
    later = []
    resumed = evaluate_model(tiny_vgg_mnpo(), ds, **common, state_file=state, save_every=0,
                             on_batch=lambda b, m: later.append(list(b["image_id"])))
    _same(whole, resumed)
    assert [i for b in later for i in b] == [i for i in ds.image_ids[6:]]  # only what was not counted
    again = []
    _same(whole, evaluate_model(tiny_vgg_mnpo(), ds, **common, state_file=state,
                                on_batch=lambda b, m: again.append(b)))
    assert again == []  # a finished state: nothing left to evaluate


def test_a_progress_file_of_another_evaluation_is_refused(data, tmp_path):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55)
    state = tmp_path / "state.json"
    evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.1), method="mnpo", batch_size=6,
                   state_file=state, run_key={"checkpoint": "a.pt"})
    with pytest.raises(ValueError, match=r"written by another evaluation \(checkpoint: 'a.pt' there, 'b.pt' now; "
                                         r"method: 'mnpo' there, 'cam' now\); delete it"):
        evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.1), method="cam", state_file=state,
                       run_key={"checkpoint": "b.pt"})
    with pytest.raises(ValueError, match="other thresholds"):
        evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.2), method="mnpo", state_file=state,
                       run_key={"checkpoint": "a.pt"})
    state.write_text("{broken")
    with pytest.raises(ValueError, match="state.json: not an evaluation progress file"):
        evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.1), method="mnpo", state_file=state)


def test_evaluate_checkpoint_keeps_one_progress_file_per_split(data, tmp_path):
    from mnpo.engine.evaluate import evaluate_checkpoint
    from mnpo.models import save_checkpoint

    save_checkpoint(tmp_path / "model.pt", tiny_vgg_mnpo())
    kwargs = dict(val_metadata=data / "metadata" / "val", method="mnpo", batch_size=6, workers=0, device="cpu",
                  input_size=48, progress=False)
    plain = evaluate_checkpoint(tmp_path / "model.pt", data / "images", data / "metadata" / "test", **kwargs)
    first = evaluate_checkpoint(tmp_path / "model.pt", data / "images", data / "metadata" / "test", **kwargs,
                                state_dir=tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["test.json", "val.json"]
    second = evaluate_checkpoint(tmp_path / "model.pt", data / "images", data / "metadata" / "test", **kwargs,
                                 state_dir=tmp_path / "state")  # continues from finished files
    assert plain.to_json() == first.to_json() == second.to_json()


def test_settings_object_and_keywords_are_one_evaluation(data):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55)
    settings = EvalSettings(cam_thresholds(0.05), method="cam", batch_size=4)
    by_object = evaluate_model(tiny_vgg_mnpo(), ds, settings)
    by_keywords = evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.05), method="cam", batch_size=4)
    overridden = evaluate_model(tiny_vgg_mnpo(), ds, settings, batch_size=5)  # a keyword overrides a field
    for other in (by_keywords, overridden):  # the same network on the same images: the same counts
        assert np.array_equal(by_object.curves.largest, other.curves.largest)
        assert (by_object.top1_correct, by_object.num_images) == (other.top1_correct, other.num_images)
    with pytest.raises(TypeError, match=r"unknown evaluation setting\(s\) \['batchsize'\]"):
        evaluate_model(tiny_vgg_mnpo(), ds, settings, batchsize=4)
    with pytest.raises(TypeError, match="needs thresholds"):
        evaluate_model(tiny_vgg_mnpo(), ds, method="cam")


def test_evaluate_batch_gives_maps_logits_and_hits(data):
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55)
    from mnpo.data.dataset import collate_evaluation

    batch = collate_evaluation([ds[i] for i in range(3)])
    model = tiny_vgg_mnpo()
    maps, logits, (top1, top5) = evaluate_batch(model, batch, EvalSettings(cam_thresholds(0.1), method="cam",
                                                                           ten_crop=False), torch.device("cpu"))
    assert maps.shape == (3, 224, 224) and logits.shape == (3, model.num_classes)
    predicted = logits.argmax(1)
    assert top1 == int((predicted == batch["label"].numpy()).sum()) and top5 == 3  # 3 classes: always in the top 5
