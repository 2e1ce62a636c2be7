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
def test_without_ten_crop_the_items_carry_only_the_view_and_score_the_same_maps(data):
    """ten_crop=False (training's validation): no ten-crop source is made; the view is the same
    and so are the localization curves of the 224-view evaluation; asking such a data set
    for ten-crop classification is refused."""
    args = (data / "images", data / "metadata" / "test", "evaluate")
    for uint8 in (True, False):
        full = WSOLDataset(*args, crop_size=48, resize_size=55, uint8_views=uint8)
        light = WSOLDataset(*args, crop_size=48, resize_size=55, uint8_views=uint8, ten_crop=False)
        a, b = full[1], light[1]
        assert "ten_crop_source" not in b and "ten_crop" not in b and set(a) - set(b)
        assert torch.equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
    common = dict(thresholds=cam_thresholds(0.01), method="mnpo", batch_size=5, ten_crop=False)
    x = evaluate_model(tiny_vgg_mnpo(), full, **common)
    y = evaluate_model(tiny_vgg_mnpo(), light, **common)
    assert np.array_equal(x.curves.largest, y.curves.largest) and x.top1_correct == y.top1_correct
    with pytest.raises(ValueError, match="the data set makes no ten crops"):
        evaluate_model(tiny_vgg_mnpo(), light, thresholds=cam_thresholds(0.1), batch_size=5)


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
    path = root / "images" / ds.image_ids[4]
    path.write_bytes(path.read_bytes()[:120])  # truncated: its header reads, its pixels do not
    return root


def _same(a, b):
    assert np.array_equal(a.curves.largest, b.curves.largest) and np.array_equal(a.curves.multi, b.curves.multi)
    assert np.array_equal(a.curves.top1, b.curves.top1) and np.array_equal(a.curves.top5, b.curves.top5)
    assert (a.num_images, a.top1_correct, a.top5_correct, a.unreadable) == \
        (b.num_images, b.top1_correct, b.top5_correct, b.unreadable)


@pytest.mark.numerics
def test_an_interrupted_evaluation_continues_to_the_uninterrupted_result(data_with_a_bad_image, tmp_path):
    root = data_with_a_bad_image
    ds = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    common = dict(thresholds=cam_thresholds(0.01), method="mnpos", batch_size=3, skip_unreadable=True)
    whole = evaluate_model(tiny_vgg_mnpo(), ds, **common)
    assert whole.num_images == 12 and list(whole.unreadable) == [ds.image_ids[4]]
    state = tmp_path / "state.json"
    batches = []

    def stop_at_third(batch, maps):
        batches.append(list(batch["image_id"]))
        if len(batches) == 3:
            raise Stop

    with pytest.raises(Stop):
        evaluate_model(tiny_vgg_mnpo(), ds, **common, state_file=state, save_every=0, on_batch=stop_at_third)
    done = json.loads(state.read_text())
    assert done["evaluator"]["n"] == 6 and list(done["unreadable"]) == [ds.image_ids[4]]  # two batches saved
    assert done["evaluator"]["misses"] == [ds.image_ids[4]]  # the bad image counted, as a miss
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
    # with 12 classes the top 5 can miss: the count is the naive one, label by label
    batch = collate_evaluation([ds[i] for i in range(len(ds))])
    model = tiny_vgg_mnpo(classes=12)
    _, logits, (top1, top5) = evaluate_batch(model, batch, EvalSettings(cam_thresholds(0.1), method="cam",
                                                                        ten_crop=False), torch.device("cpu"))
    ranked = np.argsort(-np.asarray(logits), axis=1, kind="stable").tolist()
    labels = batch["label"].tolist()
    naive5 = sum(label in row[:5] for row, label in zip(ranked, labels))
    assert top5 == naive5 and top1 == sum(row[0] == label for row, label in zip(ranked, labels))
    assert top5 < len(labels)  # this network misses some: the check above can fail


# unreadable images: an error by default, misses with skip_unreadable; never a smaller denominator
def _copy_with(data, tmp_path, damage):
    """A copy of the test split with ``damage(path)`` applied to images 1 and 6; their ids."""
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(data, root)
    ds = WSOLDataset(root / "images", root / "metadata" / "test", "evaluate", crop_size=48, resize_size=55,
                     uint8_views=True)
    for k in (1, 6):
        damage(root / "images" / ds.image_ids[k])
    return ds, [ds.image_ids[1], ds.image_ids[6]]


DAMAGE = {
    "missing": lambda p: p.unlink(),
    "not an image": lambda p: p.write_bytes(b"plain text"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:120]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_unreadable_image_is_an_error_naming_every_such_file(data, tmp_path, damage):
    from mnpo.engine.evaluate import UnreadableImagesError

    ds, bad = _copy_with(data, tmp_path, DAMAGE[damage])
    batches = []
    with pytest.raises(UnreadableImagesError) as err:
        evaluate_model(tiny_vgg_mnpo(), ds, thresholds=cam_thresholds(0.1), method="cam", batch_size=4,
                       on_batch=lambda b, m: batches.append(b))
    assert sorted(err.value.images) == sorted(bad)
    for image_id in bad:
        assert str(ds.image_root / image_id) in str(err.value)
    assert "--skip-unreadable" in str(err.value)
    assert (batches == []) == (damage != "truncated")  # found from the headers before any work, if it can be


def test_skip_unreadable_counts_each_as_a_miss_in_every_denominator(data, tmp_path):
    """Against the readable images' own counts: the same hits, two more images in each
    denominator, and for a miss at threshold 0 no box (a map of zeros would give the whole
    image as its box, an IoU above 0 with a large object)."""
    ds, bad = _copy_with(data, tmp_path, DAMAGE["truncated"])
    common = dict(thresholds=cam_thresholds(0.01), method="mnpo", batch_size=4, details=True)
    counted = evaluate_model(tiny_vgg_mnpo(), ds, skip_unreadable=True, **common)
    readable = [i for i in ds.image_ids if i not in bad]
    alone = evaluate_model(tiny_vgg_mnpo(), WSOLDataset(ds.image_root, ds.meta.select(readable), "evaluate",
                                                        crop_size=48, resize_size=55, uint8_views=True), **common)
    assert counted.num_images == alone.num_images + 2 == len(ds)
    assert np.array_equal(counted.curves.largest, alone.curves.largest)
    assert np.array_equal(counted.curves.multi, alone.curves.multi)
    assert np.array_equal(counted.curves.top1, alone.curves.top1)
    assert (counted.top1_correct, counted.top5_correct) == (alone.top1_correct, alone.top5_correct)
    assert counted.classification["top1_cls"] == 100.0 * alone.top1_correct / len(ds)
    assert sorted(counted.unreadable) == sorted(bad)
    assert all(str(ds.image_root / i) in counted.unreadable[i] for i in bad)
    records = dict(zip(counted.details.records.image_ids, counted.details.records.values))
    assert all(not records[i].any() for i in bad)  # IoU 0 at every threshold
    assert all(len(counted.details.top5[i]) == 0 for i in bad)  # no class predicted


def test_skip_unreadable_on_a_mask_split_scores_a_map_of_zeros(tmp_path):
    from mnpo.metrics.localization import MaskEvaluator

    def one_mask(_):
        mask = np.zeros((4, 4), np.uint8)
        mask[:2] = 1
        return mask

    a = MaskEvaluator(one_mask, ["x", "y"], thresholds=np.array([0.0, 0.5]), image_size=4, workers=1)
    a.update(np.full((1, 4, 4), 0.7, np.float32), ["x"])
    a.add_misses(["y"])
    b = MaskEvaluator(one_mask, ["x", "y"], thresholds=np.array([0.0, 0.5]), image_size=4, workers=1)
    b.update(np.stack([np.full((4, 4), 0.7, np.float32), np.zeros((4, 4), np.float32)]), ["x", "y"])
    assert np.array_equal(a.compute().positive, b.compute().positive) and a.compute().num_images == 2
    assert a.misses == {"y"} and b.misses == set()
    with pytest.raises(ValueError, match="'y' was already evaluated"):
        a.add_misses(["y"])


def test_a_constant_classifier_is_right_only_on_the_first_class(data):
    """Tied logits rank in class order (as argmax): a classifier that says the same for every
    class scores the share of class-0 images at top-1 and of classes 0-4 at top-5, not 100 %."""
    model = tiny_vgg_mnpo()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    ds = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", crop_size=48, resize_size=55)
    result = evaluate_model(model, ds, thresholds=cam_thresholds(0.1), method="cam", batch_size=5)
    labels = np.array([ds.meta.labels[i] for i in ds.image_ids])
    assert 0 < (labels == 0).sum() < len(labels)  # the set has class 0 and other classes
    assert result.top1_correct == (labels == 0).sum()
    assert result.top5_correct == len(labels)  # three classes: all within five
    assert result.curves.top1.max() <= (labels == 0).sum()  # Top-1 Loc counts: a box and the right class
