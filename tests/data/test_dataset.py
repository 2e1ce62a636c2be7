"""Tests of the WSOL data set, box resizing and subsampling (mnpo.data.dataset)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mnpo.data import dataset as ds
from mnpo.data.dataset import WSOLDataset, collate_evaluation, resize_boxes, subsample_per_class
from mnpo.data.metadata import SplitMetadata, read_split, write_split
from mnpo.data.transforms import ImageReadError, load_image, localization_transform, ten_crop


def _real_root() -> Path:
    env = os.environ.get("MNPO_WSOL_METADATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "wsol-metadata"


def _scalar_resize(box, w, h, target=224):
    """wsolevaluation's rule, written out one coordinate at a time."""
    x0, y0, x1, y1 = box
    return [int(float(x0) * float(target) / float(w)), int(float(y0) * float(target) / float(h)),
            int(float(x1) * float(target) / float(w)), int(float(y1) * float(target) / float(h))]


# --------------------------------------------------------------------------- #
# resize_boxes
# --------------------------------------------------------------------------- #
def test_resize_boxes_by_hand():
    # 100*224/500 = 44.8, 50*224/300 = 37.33, 400*224/500 = 179.2, 250*224/300 = 186.67
    out = resize_boxes(np.array([[100, 50, 400, 250]]), (500, 300))
    assert out.tolist() == [[44, 37, 179, 186]] and out.dtype == np.int64
    # the whole image maps onto the whole frame; x = w gives exactly 224
    assert resize_boxes(np.array([[0, 0, 499, 299], [0, 0, 500, 300]]), (500, 300)).tolist() == [
        [0, 0, 223, 223], [0, 0, 224, 224]]
    assert resize_boxes(np.zeros((0, 4), np.int64), (10, 10)).shape == (0, 4)
    assert resize_boxes(np.array([[1, 1, 2, 2]]), (4, 4), target=8).tolist() == [[2, 2, 4, 4]]


def test_resize_boxes_per_box_sizes():
    boxes = np.array([[100, 50, 400, 250], [1, 2, 3, 4]])
    sizes = np.array([[500, 300], [7, 9]])
    assert resize_boxes(boxes, sizes).tolist() == [_scalar_resize(b, *s) for b, s in zip(boxes, sizes)]


@pytest.mark.parametrize("boxes, sizes", [
    (np.array([1, 2, 3, 4]), (10, 10)),
    (np.array([[1, 2, 3]]), (10, 10)),
    (np.array([[1, 2, 3, 4]]), (0, 10)),
    (np.array([[1, 2, 3, 4]]), (10, -1)),
    (np.array([[1, 2, 3, 4], [1, 2, 3, 4]]), np.array([[10, 10], [10, 10], [10, 10]])),
])
def test_resize_boxes_rejects_bad_input(boxes, sizes):
    with pytest.raises(ValueError):
        resize_boxes(boxes, sizes)


@pytest.mark.parametrize("split", ["CUB/train", "CUB/val", "CUB/test", "ILSVRC/val", "ILSVRC/test"])
def test_resize_boxes_equals_scalar_rule_on_real_boxes(split):
    folder = _real_root() / split
    if not (folder / "localization.txt").is_file():
        pytest.skip(f"real wsolevaluation metadata not found at {folder} (set MNPO_WSOL_METADATA)")
    meta = read_split(folder)
    ids = meta.image_ids
    boxes = np.concatenate([meta.boxes[i] for i in ids])
    sizes = np.repeat(np.array([meta.sizes[i] for i in ids]), [len(meta.boxes[i]) for i in ids], axis=0)
    expected = [_scalar_resize(b, w, h) for b, (w, h) in zip(boxes.tolist(), sizes.tolist())]
    assert resize_boxes(boxes, sizes).tolist() == expected
    # the per-image form used by the data set gives the same
    first = ids[0]
    assert resize_boxes(meta.boxes[first], meta.sizes[first]).tolist() == [
        _scalar_resize(b, *meta.sizes[first]) for b in meta.boxes[first].tolist()]


def test_resize_boxes_keeps_the_operation_order():
    """``x * 224 / w`` and ``x * (224 / w)`` differ after truncation for some boxes
    (80 of the 447 188 real CUB/ILSVRC coordinates, so the test above tells them apart)."""
    x, w = 45, 80  # 45 * 224 / 80 = 126 exactly; 45 * (224 / 80) = 125.99999999999999
    assert int(x * (224.0 / w)) == 125
    assert resize_boxes(np.array([[x, 0, x, 0]]), (w, 10)).tolist() == [[126, 0, 126, 0]]


# --------------------------------------------------------------------------- #
# A tiny data set on disk
# --------------------------------------------------------------------------- #
IMAGES = {  # id: (size, label, boxes)
    "cls0/big.png": ((500, 300), 0, [[100, 50, 400, 250]]),
    "cls0/small.png": ((64, 48), 0, [[0, 0, 63, 47], [10, 12, 20, 30]]),
    "cls1/square.png": ((40, 40), 1, [[5, 5, 35, 35]]),
}


def _pixels(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture()
def tiny(tmp_path) -> tuple[Path, Path, SplitMetadata]:
    root = tmp_path / "images"
    for k, (image_id, (size, _, _)) in enumerate(IMAGES.items()):
        (root / image_id).parent.mkdir(parents=True, exist_ok=True)
        _pixels(size, k).save(root / image_id)
    meta = SplitMetadata(
        image_ids=tuple(IMAGES),
        labels={i: v[1] for i, v in IMAGES.items()},
        sizes={i: v[0] for i, v in IMAGES.items()},
        boxes={i: np.array(v[2]) for i, v in IMAGES.items()},
    )
    write_split(tmp_path / "meta", meta)
    return root, tmp_path / "meta", meta


def test_train_items(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "train")
    assert len(data) == 3 and data.image_ids == tuple(IMAGES)
    item = data[2]
    assert set(item) == {"image", "label", "image_id", "index"}
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.uint8  # normalized on the device
    assert (item["label"], item["image_id"], item["index"]) == (1, "cls1/square.png", 2)
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["image"].shape == (3, 3, 224, 224) and batch["label"].tolist() == [0, 0, 1]
    # the view is the training augmentation's, drawn from the generator the item is given
    from mnpo.data.transforms import load_image, train_transform

    decoded = load_image(root / "cls1/square.png")
    for seed in range(3):
        expected = train_transform()(decoded, torch.Generator().manual_seed(seed))
        assert torch.equal(data.item(2, torch.Generator().manual_seed(seed))["image"], expected)
    views = {data.item(2, torch.Generator().manual_seed(s))["image"].sum().item() for s in range(6)}
    assert len(views) > 1  # the generator is used, not ignored


def test_train_items_with_jpeg_draft_come_from_the_file(tiny, tmp_path):
    """data.jpeg_draft: the item is the transform's view of the file (drawn before decoding),
    with the same keys; a large JPEG is decoded at a reduced scale (its view differs a little
    from the full decode's)."""
    from mnpo.data.transforms import train_transform

    root, _, meta = tiny
    big = root / "cls0" / "huge.jpg"
    y, x = np.mgrid[0:1100, 0:1300]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(big, quality=90)
    huge = SplitMetadata(image_ids=(*meta.image_ids, "cls0/huge.jpg"), labels={**meta.labels, "cls0/huge.jpg": 0})
    draft = train_transform(random_resized=True, draft=True)
    data = WSOLDataset(root, huge, "train", draft)
    for index in range(len(data)):
        item = data.item(index, torch.Generator().manual_seed(index))
        assert set(item) == {"image", "label", "image_id", "index"} and item["index"] == index
        expected = draft.from_file(root / huge.image_ids[index], torch.Generator().manual_seed(index))
        assert torch.equal(item["image"], expected)
    plain = WSOLDataset(root, huge, "train", train_transform(random_resized=True))
    a, b = (d.item(3, torch.Generator().manual_seed(0))["image"] for d in (data, plain))
    assert not torch.equal(a, b) and (a.int() - b.int()).abs().float().mean() < 8


def test_localization_items_are_the_resized_view(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "localization")
    item = data[0]
    expected = localization_transform()(load_image(root / "cls0/big.png"))
    assert torch.equal(item["image"], expected)
    assert "boxes" not in item and "ten_crop" not in item


def test_evaluate_items(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "evaluate")
    item = data[0]
    assert set(item) == {"image", "label", "image_id", "index", "ten_crop", "boxes"}
    decoded = load_image(root / "cls0/big.png")
    assert torch.equal(item["image"], localization_transform()(decoded))
    assert torch.equal(item["ten_crop"], ten_crop(decoded))
    assert item["ten_crop"].shape == (10, 3, 224, 224)
    assert item["boxes"].dtype == np.int64
    assert item["boxes"].tolist() == [[44, 37, 179, 186]]
    # 63*224/64 = 220.5, 47*224/48 = 219.33, 10*224/64 = 35, 12*224/48 = 56, 20*224/64 = 70, 30*224/48 = 140
    assert data[1]["boxes"].tolist() == [[0, 0, 220, 219], [35, 56, 70, 140]]
    assert data[2]["boxes"].tolist() == [[28, 28, 196, 196]]  # 5*224/40 = 28, 35*224/40 = 196


def test_evaluate_decodes_each_image_once(tiny, monkeypatch):
    root, folder, _ = tiny
    calls: list[Path] = []

    def counting_load(path):
        calls.append(Path(path))
        return load_image(path)

    monkeypatch.setattr(ds, "load_image", counting_load)
    data = WSOLDataset(root, folder, "evaluate")
    for k in range(len(data)):
        data[k]
    assert calls == [root / i for i in IMAGES]


def test_evaluate_loader_with_collate(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "evaluate")
    loader = DataLoader(data, batch_size=2, num_workers=0, collate_fn=collate_evaluation)
    batches = list(loader)
    assert [len(b["image_id"]) for b in batches] == [2, 1]
    first = batches[0]
    assert first["image"].shape == (2, 3, 224, 224)
    assert first["ten_crop"].shape == (2, 10, 3, 224, 224)
    assert first["label"].dtype == torch.int64 and first["label"].tolist() == [0, 0]
    assert first["index"].tolist() == [0, 1]
    assert first["image_id"] == ["cls0/big.png", "cls0/small.png"]
    assert isinstance(first["boxes"], list) and [b.shape for b in first["boxes"]] == [(1, 4), (2, 4)]
    assert batches[1]["boxes"][0].tolist() == [[28, 28, 196, 196]]


def test_collate_rejects_mismatched_items():
    with pytest.raises(ValueError, match="empty"):
        collate_evaluation([])
    with pytest.raises(ValueError, match="keys"):
        collate_evaluation([{"label": 1}, {"label": 1, "boxes": np.zeros((1, 4))}])


def test_boxes_use_metadata_size_not_decoded_size(tiny, tmp_path):
    """A stored copy at another resolution still gets boxes from image_sizes.txt."""
    root, _, meta = tiny
    _pixels((250, 150), 9).save(root / "cls0/big.png")  # half-size copy on disk
    data = WSOLDataset(root, meta, "evaluate")
    assert data[0]["boxes"].tolist() == [[44, 37, 179, 186]]
    # without image_sizes.txt the decoded size is used
    no_sizes = SplitMetadata(image_ids=meta.image_ids, labels=meta.labels, boxes=meta.boxes)
    assert WSOLDataset(root, no_sizes, "evaluate")[0]["boxes"].tolist() == [
        _scalar_resize([100, 50, 400, 250], 250, 150)]


def test_mask_set_items(tiny, tmp_path):
    root, _, meta = tiny
    masks = SplitMetadata(
        image_ids=meta.image_ids, labels=meta.labels,
        mask_paths={i: (f"m/{k}_0.png", f"m/{k}_1.png") for k, i in enumerate(meta.image_ids)},
        ignore_paths={i: (f"m/{k}_ignore.png" if k else "") for k, i in enumerate(meta.image_ids)},
    )
    item = WSOLDataset(root, masks, "evaluate", mask_root=tmp_path / "masks")[1]
    assert item["mask_paths"] == (str(tmp_path / "masks/m/1_0.png"), str(tmp_path / "masks/m/1_1.png"))
    assert item["ignore_path"] == str(tmp_path / "masks/m/1_ignore.png")
    item = WSOLDataset(root, masks, "evaluate")[0]
    assert item["mask_paths"] == ("m/0_0.png", "m/0_1.png") and item["ignore_path"] == ""
    assert "boxes" not in item
    batch = collate_evaluation([item, item])
    assert batch["ignore_path"] == ["", ""] and len(batch["mask_paths"]) == 2


def test_transform_override(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "train", transform=lambda im: torch.tensor(im.size))
    assert data[0]["image"].tolist() == [500, 300]
    data = WSOLDataset(root, folder, "evaluate", transform=lambda im: torch.zeros(1))
    item = data[0]
    assert item["image"].shape == (1,) and item["ten_crop"].shape == (10, 3, 224, 224)


def test_missing_image_names_the_file(tiny):
    root, folder, _ = tiny
    (root / "cls0/small.png").unlink()
    data = WSOLDataset(root, folder, "localization")
    with pytest.raises(ImageReadError) as err:
        data[1]
    assert err.value.path == str(root / "cls0/small.png")


def test_bad_arguments(tiny):
    root, folder, meta = tiny
    with pytest.raises(ValueError, match="mode"):
        WSOLDataset(root, folder, "test")
    with pytest.raises(ValueError, match="num_classes"):
        WSOLDataset(root, meta, "train", num_classes=1)
    with pytest.raises(IndexError):
        WSOLDataset(root, meta, "train")[3]


# --------------------------------------------------------------------------- #
# Subsampling
# --------------------------------------------------------------------------- #
def _many(num_classes: int = 5, per_class: int = 20) -> SplitMetadata:
    ids = tuple(f"c{c}/{k}.jpg" for k in range(per_class) for c in range(num_classes))  # interleaved
    return SplitMetadata(image_ids=ids, labels={i: int(i[1]) for i in ids})


def test_subsample_per_class():
    meta = _many()
    a = subsample_per_class(meta, 3, seed=0)
    assert len(a) == 15
    counts = np.bincount([a.labels[i] for i in a.image_ids])
    assert counts.tolist() == [3] * 5
    # file order kept
    position = {i: k for k, i in enumerate(meta.image_ids)}
    assert [position[i] for i in a.image_ids] == sorted(position[i] for i in a.image_ids)
    # deterministic for a seed, different across seeds
    assert subsample_per_class(meta, 3, seed=0) == a
    assert subsample_per_class(meta, 3, seed=1) != a
    # a class with fewer images is kept whole
    assert len(subsample_per_class(meta, 25, seed=0)) == 100
    with pytest.raises(ValueError):
        subsample_per_class(meta, 0)


def test_dataset_subsampling(tiny):
    root, folder, _ = tiny
    data = WSOLDataset(root, folder, "evaluate", num_per_class=1, seed=3)
    assert len(data) == 2
    assert sorted(data.meta.labels.values()) == [0, 1]
    assert data.image_ids == WSOLDataset(root, folder, "evaluate", num_per_class=1, seed=3).image_ids
    item = data[len(data) - 1]
    assert item["image_id"] == "cls1/square.png" and item["boxes"].tolist() == [[28, 28, 196, 196]]


def test_package_exports():
    import mnpo.data

    for name in mnpo.data.__all__:
        assert getattr(mnpo.data, name) is not None, name
    assert mnpo.data.WSOLDataset is WSOLDataset and mnpo.data.resize_boxes is resize_boxes
    with pytest.raises(AttributeError):
        mnpo.data.no_such_name
