"""The training input pipeline (mnpo.engine.train_input): keys, seeded items, the one loader,
normalization on the device."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mnpo.data.dataset import WSOLDataset
from mnpo.data.metadata import SplitMetadata
from mnpo.data.transforms import load_image, normalize_image, train_transform
from mnpo.engine.train_input import EpochSampler, TrainingItems, device_images, item_seed, training_loader
from mnpo.engine.training_methods import HideAndSeek


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight noisy RGB images of two classes, 40x30 to 75x65 pixels."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    ids = []
    for k in range(8):
        image_id = f"c{k % 2}/{k}.png"
        (root / image_id).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + 5 * k, 40 + 5 * k, 3), dtype=np.uint8)).save(root / image_id)
        ids.append(image_id)
    meta = SplitMetadata(image_ids=tuple(ids), labels={i: k % 2 for k, i in enumerate(ids)})
    return root, meta


def dataset(photos, **kw):
    root, meta = photos
    return WSOLDataset(root, meta, "train", crop_size=24, resize_size=32, **kw)


def test_an_item_is_drawn_from_its_key_alone_and_not_from_the_global_generator(photos):
    data = dataset(photos)
    hide = HideAndSeek(8, 0.5)
    items = TrainingItems(data, seed=3, hide=hide)
    before = torch.get_rng_state()
    item = items[(1, 5)]
    assert torch.equal(torch.get_rng_state(), before)  # dropout's generator is left alone
    # by definition: the view, then the cells, from one generator seeded by (seed, epoch, index)
    g = torch.Generator().manual_seed(item_seed(3, 1, 5))
    view = train_transform(24, 32)(load_image(photos[0] / data.image_ids[5]), g)
    assert torch.equal(item["image"], view) and item["image"].dtype == torch.uint8
    assert torch.equal(item["hidden_cells"], hide.hidden_cells(24, 24, g))
    assert item["index"] == 5 and item["label"] == 1
    torch.manual_seed(99)  # whatever the global generator holds, and in whatever order
    assert torch.equal(items[(1, 5)]["image"], item["image"])
    others = [items[(e, 5)]["image"] for e in (0, 2, 3)]  # another epoch draws again
    assert any(not torch.equal(o, item["image"]) for o in others)
    assert item_seed(3, 1, 5) != item_seed(3, 0, 5) != item_seed(4, 1, 5)
    assert "hidden_cells" not in TrainingItems(data, seed=3, hide=HideAndSeek(0, 0.5))[(1, 5)]  # grid 0: off


def test_an_unreadable_image_becomes_a_skipped_item(photos, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(photos[0], root)
    (root / photos[1].image_ids[2]).write_bytes(b"not an image")
    items = TrainingItems(WSOLDataset(root, photos[1], "train", crop_size=24, resize_size=32), seed=0)
    item = items[(0, 2)]
    assert item["skipped"] == photos[1].image_ids[2] and str(root / photos[1].image_ids[2]) in item["reason"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_keys_are_the_epochs_permutation_shared_by_rank(world):
    """DistributedSampler's rule: randperm(n) from a generator seeded seed + epoch, cut to a
    multiple of W (drop_last), rank r takes perm[r::W]."""
    n, seed = 11, 5
    samplers = [EpochSampler(n, world, r, seed) for r in range(world)]
    for epoch in (0, 4):
        for s in samplers:
            s.set_epoch(epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        perm = perm[: n - n % world]
        for r, s in enumerate(samplers):
            assert list(s) == [(epoch, i) for i in perm[r::world]] and len(s) == n // world


class PidItems(torch.utils.data.Dataset):
    """Items that say which process made them, with a draw from their generator."""

    image_ids = tuple(f"{k}.png" for k in range(12))

    def __len__(self):
        return 12

    def item(self, index, generator):
        draw = torch.randint(0, 256, (3, 2, 2), dtype=torch.uint8, generator=generator)
        return {"image": draw, "label": index % 3, "index": index, "pid": os.getpid()}


def test_one_loader_serves_every_epoch_with_the_same_workers_and_the_same_batches():
    """Two workers stay alive across epochs (the same processes make epoch 2's items), the
    batches equal those of workers 0 item for item, and neither touches the global generator."""
    def epochs(workers):
        items = TrainingItems(PidItems(), seed=1)
        sampler = EpochSampler(12, 1, 0, seed=1)
        loader = training_loader(items, sampler, 4, workers, torch.device("cpu"), seed=1)
        assert loader.persistent_workers == (workers > 0) and loader.pin_memory is False
        out = []
        before = torch.get_rng_state()
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.append([(b["index"].tolist(), b["image"], set(b["pid"].tolist())) for b in loader])
        assert torch.equal(torch.get_rng_state(), before)
        return out

    single, multi = epochs(0), epochs(2)
    for a, b in zip(single, multi, strict=True):
        for (ia, xa, _), (ib, xb, _) in zip(a, b, strict=True):
            assert ia == ib and torch.equal(xa, xb)
    assert {p for _, _, pids in single[0] for p in pids} == {os.getpid()}
    workers = [{p for _, _, pids in epoch for p in pids} for epoch in multi]
    assert len(workers[0]) == 2 and os.getpid() not in workers[0]
    assert workers[1] == workers[0]  # persistent: not new processes for the second epoch
    assert single[0][0][0] != single[1][0][0]  # and the epochs' orders differ


def test_the_loader_pins_memory_for_cuda_only():
    items, sampler = TrainingItems(PidItems(), seed=0), EpochSampler(12, 1, 0, seed=0)
    assert training_loader(items, sampler, 4, 0, torch.device("cuda", 1), seed=0).pin_memory is True
    assert training_loader(items, sampler, 4, 0, torch.device("cpu"), seed=0).pin_memory is False


def test_device_images_normalize_uint8_and_hide_cells_after_normalization(photos):
    data = dataset(photos)
    images = torch.stack([data.item(k, torch.Generator().manual_seed(k))["image"] for k in range(3)])
    expected = torch.stack([normalize_image(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in images])
    out = device_images({"image": images}, torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    # HaS: the per-image call on the normalized image, with the same cells, batched
    hide = HideAndSeek(8, 0.5)
    cells = torch.stack([hide.hidden_cells(24, 24, torch.Generator().manual_seed(k)) for k in range(3)])
    hidden = device_images({"image": images, "hidden_cells": cells}, torch.device("cpu"), hide)
    for k in range(3):
        assert torch.equal(hidden[k], hide(expected[k], torch.Generator().manual_seed(k)))
    assert 0 < int(cells.sum()) < cells.numel()  # some cells hidden, some kept
    # a user's float transform is taken as normalized; channels_last on request
    floats = torch.randn(2, 3, 8, 8)
    assert torch.equal(device_images({"image": floats}, torch.device("cpu")), floats)
    last = device_images({"image": images}, torch.device("cpu"), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected)
