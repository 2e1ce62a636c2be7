"""HaS, CutMix, ADL and SPG's loss against their definitions (spec wsol-methods.md 2.1-2.5) on small
tensors with fixed generators; training with each runs, changes training only, and resumes
bit-identically."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnpo.engine.config import ConfigError
from mnpo.engine.train import Trainer
from mnpo.engine.training_methods import HideAndSeek, cutmix_batch, draw_cutmix, mixed_loss, spg_loss, spg_mask
from mnpo.models import load_model

from engine.test_train import Stop, config, synth  # noqa: F401  (the module's data fixture)


def test_has_hides_whole_cells_by_the_draws_in_row_major_order():
    image = torch.randn(3, 10, 9)
    before = image.clone()
    has = HideAndSeek(grid=4, drop_rate=0.5)
    out = has(image, torch.Generator().manual_seed(3))
    draws = torch.rand(3, 3, generator=torch.Generator().manual_seed(3))  # ceil(10/4) x ceil(9/4) cells
    for r in range(3):
        for c in range(3):
            cell = (slice(None), slice(4 * r, min(4 * r + 4, 10)), slice(4 * c, min(4 * c + 4, 9)))
            if draws[r, c] <= 0.5:  # hidden: every channel of every pixel of the (truncated) cell
                assert (out[cell] == 0).all(), (r, c)
            else:
                assert torch.equal(out[cell], image[cell]), (r, c)
    assert 0 < int((draws <= 0.5).sum()) < 9  # this seed hides some cells and keeps others
    assert torch.equal(image, before)  # the input is not edited in place


def test_has_hides_cells_with_the_drop_rate():
    """Over 224x224 images at grid 4 (3136 cells each) and 50 images, the hidden fraction is
    within 5 standard deviations of the rate (binomial: sqrt(p (1 - p) / n))."""
    g = torch.Generator().manual_seed(0)
    for rate in (0.1, 0.5, 0.9):
        has = HideAndSeek(4, rate)
        hidden = torch.stack([has.hidden_cells(224, 224, g) for _ in range(50)]).float()
        n = hidden.numel()
        assert abs(hidden.mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / n), rate
    image = torch.randn(3, 8, 8)
    assert torch.equal(HideAndSeek(0, 0.5)(image), image)        # grid 0: off
    assert torch.equal(HideAndSeek(4, 0.0)(image, g), image)      # only a draw of exactly 0 (2**-24) would hide
    assert (HideAndSeek(4, 1.0)(image, g) == 0).all()             # every draw is <= 1
    with pytest.raises(ValueError, match="has_grid_size must be >= 0"):
        HideAndSeek(-1, 0.5)
    with pytest.raises(ValueError, match=r"has_drop_rate must be in \[0, 1\], got 1.5"):
        HideAndSeek(4, 1.5)


def test_cutmix_box_partner_and_lambda_by_hand():
    seed, b, s, beta = 7, 6, 224, 1.0
    rng = np.random.default_rng(seed)
    u, lam = rng.random(), rng.beta(beta, beta)
    perm = rng.permutation(b)
    cx, cy = rng.integers(0, s), rng.integers(0, s)
    assert u < 1.0
    cut = int(s * math.sqrt(1 - lam))
    x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, s)
    y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, s)
    mix = draw_cutmix(b, s, s, beta, 1.0, np.random.default_rng(seed))
    assert mix.box == (x0, y0, x1, y1) and mix.partner.tolist() == perm.tolist()
    assert mix.lam == 1 - (x1 - x0) * (y1 - y0) / s**2

    images = torch.randn(b, 3, s, s)
    labels = torch.arange(b) * 10
    mixed, partner_labels, lam = cutmix_batch(images, labels, beta, 1.0, np.random.default_rng(seed))
    assert lam == mix.lam and partner_labels.tolist() == (labels[perm]).tolist()
    inside = torch.zeros(s, s, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for i in range(b):
        assert torch.equal(mixed[i][:, inside], images[perm[i]][:, inside])
        assert torch.equal(mixed[i][:, ~inside], images[i][:, ~inside])


def test_cutmix_off_and_the_mixed_loss():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for beta, prob in ((1.0, 0.0), (0.0, 1.0)):  # probability 0, or beta 0: the batch as it is
        out, partner_labels, lam = cutmix_batch(images, labels, beta, prob, np.random.default_rng(0))
        assert out is images and torch.equal(partner_labels, labels) and lam == 1.0
    logits = (torch.randn(4, 5), torch.randn(4, 5))
    other = torch.tensor([3, 2, 1, 0])
    expected = sum(0.3 * F.cross_entropy(l, labels) + 0.7 * F.cross_entropy(l, other) for l in logits)
    assert torch.allclose(mixed_loss(logits, labels, other, 0.3), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, layout", [
    ({"name": "has"}, "vgg16-mnpo"), ({"name": "cutmix"}, "vgg16-mnpo"), ({"name": "adl"}, "vgg16-mnpo"),
    ({"name": "acol"}, "vgg16-acol"), ({"name": "spg"}, "vgg16-spg"), ({"name": "spg"}, "inception_v3-spg"),
    ({"name": "bas"}, "vgg16-bas"), ({"name": "bas"}, "resnet50-bas"), ({"name": "bas"}, "inception_v3-bas"),
    ({"name": "bgc", "bgc_warmup_epochs": 1}, "vgg16-bgc"), ({"name": "bgc", "bgc_warmup_epochs": 1}, "resnet50-bgc"),
    ({"name": "bgc", "bgc_warmup_epochs": 1}, "inception_v3-bgc"),
])
def test_training_with_a_method_resumes_bit_identically(synth, tmp_path, method, layout):  # noqa: F811
    """Each method's draws are keyed by (seed, epoch, image or step): an interrupted run resumed
    ends with the uninterrupted run's weights; and the method does change training (against
    plain training of the same network; ACoL and SPG: of the CAM network of the backbone)."""
    short = {"epochs": 2, "lr_milestones": [1]}
    model = {"layout": layout}
    Trainer(config(synth, tmp_path / "full", method=method, optim=short, model=model), progress=False).fit()

    def stop(epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(config(synth, tmp_path / "cut", method=method, optim=short, model=model), progress=False,
                on_epoch_end=stop).fit()
    Trainer(config(synth, tmp_path / "cut", method=method, optim=short, model=model), resume=True,
            progress=False).fit()
    plain_layout = layout if method["name"] not in ("acol", "spg", "bas", "bgc") else layout.split("-")[0] + "-cam"
    Trainer(config(synth, tmp_path / "plain", optim=short, model={"layout": plain_layout}), progress=False).fit()
    full, payload = load_model(tmp_path / "full" / "last.pt")
    cut, _ = load_model(tmp_path / "cut" / "last.pt")
    plain, _ = load_model(tmp_path / "plain" / "last.pt")
    for (k, a), b in zip(full.state_dict().items(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    key = {"inception_v3": "Mixed_6e.branch_pool.conv.weight", "resnet50": "layer3.0.conv1.weight"}.get(
        layout.split("-")[0], "features.28.weight")
    assert not torch.equal(full.backbone.state_dict()[key], plain.backbone.state_dict()[key])
    assert payload["training"]["config"]["method"]["name"] == method["name"]


@pytest.mark.parametrize("method, message", [
    ({"name": "mixup"}, r"method.name: 'mixup'; choose one of \('plain', 'has', 'cutmix', 'adl', 'acol', 'spg', 'bas', 'bgc', 'tscam', 'sat', 'scm', 'fsl'\)"),
    ({"name": "bas"}, r"model.layout: 'vgg16-mnpo' is not a bas network; method 'bas' needs 'vgg16-bas'"),
    ({"bas_weights": "openimages"}, r"method.bas_weights: 'openimages'; choose one of \('cub', 'ilsvrc'\)"),
    ({"bas_beta": -1.0}, r"method.bas_beta: must be >= 0 \(or null: the authors' value\), got -1.0"),
    ({"bas_lambda_fg": float("nan")}, r"method.bas_lambda_fg: must be >= 0"),
    ({"name": "acol"}, r"model.layout: 'vgg16-mnpo' is not an acol network; method 'acol' needs 'vgg16-acol'"),
    ({"acol_threshold": 1.2}, r"method.acol_threshold: must be in \[0, 1\], got 1.2"),
    ({"spg_thresholds": [0.7, 0.01]}, r"method.spg_thresholds: expected 6 values in \[0, 1\]"),
    ({"spg_thresholds": [0.7, 0.01, 0.5, 0.05, 0.7, -0.1]}, r"method.spg_thresholds: expected 6 values"),
    ({"adl_threshold": 1.5}, r"method.adl_threshold: must be in \[0, 1\]"),
    ({"adl_drop_rate": -0.5}, r"method.adl_drop_rate: must be in \[0, 1\]"),
    ({"has_grid_size": -2}, "method.has_grid_size: must be >= 0"),
    ({"has_drop_rate": 2.0}, r"method.has_drop_rate: must be in \[0, 1\], got 2.0"),
    ({"cutmix_prob": -0.1}, r"method.cutmix_prob: must be in \[0, 1\]"),
    ({"cutmix_beta": -1.0}, "method.cutmix_beta: must be >= 0"),
    ({"beta": 1.0}, "unknown key 'method.beta'"),
])
def test_bad_method_settings_are_named(synth, tmp_path, method, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        config(synth, tmp_path, method=method)


@pytest.mark.parametrize("layout, method", [("resnet50-acol", "plain"), ("vgg16-spg", "has"), ("inception_v3-spg", "fsl"),
                                            ("resnet50-bas", "acol")])
def test_acol_and_spg_networks_train_only_with_their_method(synth, tmp_path, layout, method):  # noqa: F811
    kind = layout.split("-")[1]
    with pytest.raises(ConfigError, match=f"method.name: '{method}', but model.layout '{layout}' is the {kind} "
                                          f"network; set method.name: {kind}"):
        config(synth, tmp_path, method={"name": method}, model={"layout": layout})


def test_foreground_targets_by_hand(tmp_path):
    from mnpo.data.foreground import foreground_target
    from mnpo.data.metadata import SplitMetadata

    meta = SplitMetadata(("a.png",), {"a.png": 2}, sizes={"a.png": (20, 10)},
                         boxes={"a.png": np.array([[0, 0, 9, 4], [10, 5, 19, 9]])})
    target = foreground_target(meta, "a.png", 10)
    # into the 10x10 frame: x halves (int(x * 10 / 20)), y stays: (0,0,4,4) and (5,5,9,9), corners inclusive
    expected = np.zeros((10, 10), np.uint8)
    expected[0:5, 0:5] = 1
    expected[5:10, 5:10] = 1
    assert np.array_equal(target, expected)


def test_foreground_loss_ignores_255_and_counts_pixel_accuracy():
    from mnpo.engine.training_methods import check_foreground_targets, foreground_logits, foreground_loss

    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]]])
    target = torch.tensor([[[1, 0], [0, 255]]], dtype=torch.uint8)
    loss, accuracy = foreground_loss(logits, target)
    expected = (F.softplus(-torch.tensor(2.0)) + F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(0.5))) / 3
    assert torch.allclose(loss, expected, rtol=0, atol=1e-6)
    assert isinstance(accuracy, torch.Tensor) and float(accuracy) == pytest.approx(2 / 3)  # stays on the device
    # a foreground pixel with logit 0 is wrong, a background one right (logit > 0 is foreground)
    _, edge = foreground_loss(torch.zeros(1, 1, 2), torch.tensor([[[1, 0]]], dtype=torch.uint8))
    assert float(edge) == 0.5
    check_foreground_targets(target, ["a.png"])  # some pixel to learn from: accepted
    with pytest.raises(ValueError, match=r"every pixel of the batch is ignored.*\(images a.png, b.png\)"):
        check_foreground_targets(torch.full((2, 2, 2), 255, dtype=torch.uint8), ["a.png", "b.png"])
    features, w, b = torch.randn(2, 4, 3, 3), torch.randn(1, 4), torch.randn(1)
    same = foreground_logits(features, w, b, (3, 3))  # at its own resolution: a 1x1 convolution
    assert torch.allclose(same, torch.einsum("bchw,c->bhw", features, w[0]) + b, rtol=0, atol=1e-5)


def test_fsl_trains_on_val_and_is_evaluated_calibrated_on_its_holdout(synth, tmp_path, capsys):  # noqa: F811
    """fsl: a one-output network trained on val's boxes (minus the held-out images), chosen on
    the held-out images; `mnpo evaluate` scores it calibrated on fsl-holdout/, without classes."""
    import json

    from mnpo.cli import main
    from mnpo.data.metadata import read_split

    out = tmp_path / "fsl"
    cfg = config(synth, out, method={"name": "fsl", "fsl_holdout_per_class": 1}, model={"layout": "vgg16-cam"},
                 optim={"epochs": 2, "lr_milestones": [1], "batch_size": 2})
    trainer = Trainer(cfg, progress=False)
    val = read_split(synth / "metadata" / "val")
    holdout = read_split(out / "fsl-holdout")
    assert len(holdout) == val.num_classes and set(holdout.image_ids) <= set(val.image_ids)
    assert len(trainer.train_set) == len(val) - len(holdout)
    assert not set(trainer.train_set.image_ids) & set(holdout.image_ids)
    trainer.fit()
    model, payload = load_model(out / "best.pt")
    assert model.num_classes == 1 and payload["meta"]["task"] == "foreground"
    assert main(["evaluate", "-q", "--checkpoint", str(out / "best.pt"), "--data", str(synth / "images"),
                 "--metadata", str(synth / "metadata" / "test"), "--val-metadata", str(out / "fsl-holdout"),
                 "--input-size", "48", "--workers", "0", "--method", "cam", "--json", str(tmp_path / "r.json")]) == 0
    assert "classification: none: a foreground model" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["info"]["classification"] is None and "top1_loc" not in report["oracle"]
    n = report["info"]["num_images"]
    assert n == len(read_split(synth / "metadata" / "test"))
    oracle, calibrated = (report[p]["max_box_acc_v2"]["value"] for p in ("oracle", "calibrated"))
    for value in (oracle, calibrated):  # a mean of three counts out of n, in percent
        assert value * 3 * n / 100 == pytest.approx(round(value * 3 * n / 100), abs=1e-6)
    assert oracle >= calibrated  # the oracle's thresholds are the test split's best


def test_fsl_on_masks_learns_from_the_masks_and_validates_by_pxap(synth, tmp_path):  # noqa: F811
    from mnpo.data.foreground import ForegroundDataset
    from mnpo.metrics.masks import load_gt_mask

    from engine.test_train import rows, val_pxap_of

    masks = {"metadata": str(synth / "metadata-masks"), "mask_root": str(synth / "masks")}
    out = tmp_path / "run"
    trainer = Trainer(config(synth, out, data=masks, method={"name": "fsl"}, model={"layout": "vgg16-cam"},
                             optim={"epochs": 1, "batch_size": 2}, eval={"metric": "pxap"}), progress=False)
    assert isinstance(trainer.train_set, ForegroundDataset)
    item = ForegroundDataset(synth / "images", trainer.train_set.meta, size=48, mask_root=synth / "masks",
                             flip=False)[0]
    meta = trainer.train_set.meta
    image_id = meta.image_ids[0]
    assert torch.equal(item["target"], torch.from_numpy(
        load_gt_mask(synth / "masks", meta.mask_paths[image_id], meta.ignore_paths[image_id], 48)))
    trainer.fit()
    row = rows(out / "metrics.csv")[0]
    assert "val_top1_cls" not in row
    # the PxAP of the saved weights on the held-out images, by `mnpo evaluate` and by definition
    holdout = {"metadata": str(tmp_path / "holdout-meta"), "mask_root": masks["mask_root"]}
    (tmp_path / "holdout-meta").mkdir()
    (tmp_path / "holdout-meta" / "val").symlink_to(out / "fsl-holdout")
    assert float(row["val_pxap"]) == pytest.approx(
        val_pxap_of(synth, out / "last.pt", holdout, tmp_path / "maps", trainer.cfg.eval.method), rel=1e-9)
    with pytest.raises(ConfigError, match="'top1_cls' means nothing for fsl"):
        config(synth, out, method={"name": "fsl"}, eval={"metric": "top1_cls"})


def test_adl_by_hand():
    """Channel means 1, 2, 3, 4 on a 2x2 map: importance sigmoid(mean); the drop mask at
    threshold 0.7 keeps the pixels below 0.7 * 4 = 2.8 (means 1 and 2)."""
    from mnpo.engine.training_methods import adl

    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.stack([mean - 0.5, mean + 0.5])[None]  # (1, 2, 2, 2), channel mean = ``mean``
    draws = [float(torch.rand((), generator=torch.Generator().manual_seed(k))) for k in range(2)]
    k_drop, k_keep = (0, 1) if draws[0] < draws[1] else (1, 0)
    rate = (draws[k_drop] + draws[k_keep]) / 2  # between the two draws: one seed drops, the other does not
    dropped = adl(x, rate, 0.7, torch.Generator().manual_seed(k_drop))
    assert torch.equal(dropped, x * torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    weighted = adl(x, rate, 0.7, torch.Generator().manual_seed(k_keep))
    assert torch.allclose(weighted, x * torch.sigmoid(mean), rtol=0, atol=1e-7)


def test_adl_picks_the_drop_mask_with_its_rate_and_is_the_identity_in_eval():
    from mnpo.engine.training_methods import ADL_POSITIONS, adl, attach_adl
    from mnpo.models import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 4, 4) + 0.1
    importance = x * torch.sigmoid(x.mean(1, keepdim=True))
    drops = sum(not torch.equal(adl(x, 0.75, 0.9, g), importance) for _ in range(2000))
    assert abs(drops / 2000 - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 2000)
    for layout in ("vgg16-cam", "vgg16-mnpo", "resnet50-cam", "inception_v3-cam", "inception_v3-mnpo"):
        torch.manual_seed(0)
        model = build_model(layout, 3, width=0.0625)
        images = torch.randn(2, 3, 64, 64)
        model.eval()
        with torch.no_grad():
            plain = model(images).logits[0]
        handles = attach_adl(model, 0.75, 0.9, torch.Generator().manual_seed(1))
        assert len(handles) == 3
        with torch.no_grad():
            assert torch.equal(model(images).logits[0], plain), layout  # eval: the identity
            model.train()
            assert not torch.allclose(model(images).logits[0], plain), layout
        for h in handles:
            h.remove()
    vgg = build_model("vgg16-cam", 3, width=0.0625).backbone
    tap = vgg._tap_index
    assert ADL_POSITIONS["vgg16"] == tuple(f"backbone.features.{i}" for i in
                                           (tap["conv3_3"] + 1, tap["conv4_3"], tap["conv5_3"]))
    assert isinstance(vgg.features[tap["conv3_3"] + 1], torch.nn.MaxPool2d)  # after the third pool


def test_spg_mask_by_hand():
    """Image 0: 40 pixels above high (0.7) -> 1; those below low (0.1) -> 0; the rest ignored.
    Image 1: only 3 above high, fewer than 30: the threshold becomes 0.7 x its max (0.6 -> 0.42).
    Image 2: NaN (a constant map after min-max) passes nothing: all ignored."""
    attention = torch.full((3, 10, 10), 0.5)
    attention[0].view(-1)[:40] = 0.8
    attention[0].view(-1)[40:50] = 0.05
    attention[1].view(-1)[:3] = 0.6
    attention[1].view(-1)[3:10] = 0.45
    attention[1].view(-1)[10:12] = 0.41
    attention[1].view(-1)[12] = 0.0
    attention[2] = float("nan")
    mask = spg_mask(attention, high=0.7, low=0.1)
    assert mask.dtype == torch.uint8
    flat = mask.flatten(1)
    assert flat[0, :40].eq(1).all() and flat[0, 40:50].eq(0).all() and flat[0, 50:].eq(255).all()
    assert flat[1, :10].eq(1).all() and flat[1, 10:12].eq(255).all() and flat[1, 12] == 0
    assert flat[1, 13:].eq(1).all()  # 0.5 > 0.42: the fallback threshold takes them too
    assert flat[2].eq(255).all()
    # low overrides high where both apply (high < low)
    assert spg_mask(torch.full((1, 8, 8), 0.5), high=0.4, low=0.6).eq(0).all()


def naive_spg_loss(logits, features, labels, classifier, thresholds, size):
    """wsolevaluation's arithmetic, image by image: the K-channel class maps (1x1 conv), upsampled,
    channel y, min-max; masks filled with a loop; BCE over the kept pixels of the batch."""
    up = torch.nn.Upsample(size=size, mode="bilinear", align_corners=False)
    h1, l1, h2, l2, h3, l3 = thresholds
    maps = F.conv2d(features["main"], classifier.weight[:, :, None, None], classifier.bias)
    attention = up(maps)[range(len(labels)), labels][:, None].detach()
    flat = attention.flatten(2)
    attention = (attention - flat.min(2).values[..., None, None]) / (flat.max(2).values - flat.min(2).values)[..., None, None]

    def mask(att, high, low):
        m = torch.full(att.shape, 255.0, dtype=att.dtype)
        for b in range(len(att)):
            fg = att[b] > high
            if fg.sum() < 30:
                fg = att[b] > att[b].max() * 0.7
            m[b][fg] = 1.0
        m[att < low] = 0.0
        return m

    def side(logit_map, m):
        x, t = up(logit_map)[:, 0].reshape(-1), m[:, 0].reshape(-1)
        keep = t < 255
        return torch.nn.BCEWithLogitsLoss()(x[keep], t[keep])

    b2i = torch.sigmoid(up(features["spg_b2"])).detach()
    fused = ((torch.sigmoid(up(features["spg_b1"])) + torch.sigmoid(up(features["spg_b2"]))) / 2).detach()
    return (F.cross_entropy(logits, labels) + side(features["spg_b2"], mask(attention, h1, l1))
            + side(features["spg_b1"], mask(b2i, h2, l2)) + side(features["spg_c"], mask(fused, h3, l3)))


def test_spg_loss_equals_the_naive_per_image_version():
    """Random side outputs (scaled so every mask has kept pixels of both kinds), float64."""
    torch.manual_seed(5)
    classifier = torch.nn.Linear(8, 5).double()
    features = {"main": torch.randn(3, 8, 7, 7, dtype=torch.float64),
                **{k: 3 * torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
                   for k in ("spg_b1", "spg_b2", "spg_c")}}
    logits = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([4, 0, 2])
    thresholds = [0.7, 0.01, 0.5, 0.05, 0.7, 0.1]
    ours = spg_loss(logits, features, labels, classifier, thresholds, (56, 56))
    naive = naive_spg_loss(logits, features, labels, classifier, thresholds, (56, 56))
    # float64 in both, means of 3 x 56 x 56 terms of size ~1: rounding far below 1e-10
    assert abs(float(ours.detach()) - float(naive.detach())) < 1e-10
    (grad,) = torch.autograd.grad(ours, features["spg_c"])
    assert grad.abs().sum() > 0  # the side outputs learn; the masks carry no gradient


def test_spg_loss_of_an_all_ignored_mask_is_zero_not_nan():
    """A constant class map normalizes to NaN: its mask ignores every pixel. wsolevaluation's mean
    over no pixels is NaN; ours adds 0 for that term."""
    classifier = torch.nn.Linear(4, 2)
    features = {"main": torch.ones(1, 4, 4, 4), **{k: torch.zeros(1, 1, 4, 4, requires_grad=True)
                                                   for k in ("spg_b1", "spg_b2", "spg_c")}}
    logits = torch.zeros(1, 2)
    loss = spg_loss(logits, features, torch.tensor([1]), classifier, [0.7, 0.01, 0.5, 0.05, 0.7, 0.1], (16, 16))
    assert torch.isfinite(loss)


def test_bgc_warm_up_switches_the_alignment_losses_on_at_its_epoch(synth, tmp_path, monkeypatch):  # noqa: F811
    """``bgc_warmup_epochs: 2`` of 3: the loss is called warm in epochs 1 and 2 and not in 3, with the
    recipe's drop settings on the network; the losses are finite."""
    import mnpo.engine.train as train_module

    calls, real = [], train_module.bgc_loss

    def spy(logits, features, labels, weight, weights, dataset, warm):
        calls.append((trainer.model.drop_threshold, trainer.model.drop_prob, dataset, warm))
        loss = real(logits, features, labels, weight, weights, dataset, warm)
        assert torch.isfinite(loss)
        return loss

    monkeypatch.setattr(train_module, "bgc_loss", spy)
    cfg = config(synth, tmp_path / "run", model={"layout": "vgg16-bgc"},
                 method={"name": "bgc", "bgc_warmup_epochs": 2, "bgc_drop_prob": 0.9, "bgc_dataset": "ilsvrc"},
                 optim={"epochs": 3, "lr_milestones": [2]})
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    steps = len(calls) // 3
    assert steps >= 1 and len(calls) == 3 * steps
    assert [c[3] for c in calls] == [True] * (2 * steps) + [False] * steps
    assert {c[:3] for c in calls} == {(0.8, 0.9, "ilsvrc")}


@pytest.mark.parametrize("method, layout, per_rank", [
    ({"name": "bgc"}, "vgg16-bgc", True), ({"name": "adl"}, "vgg16-mnpo", False),
])
def test_drop_draws_are_a_ranks_own_for_bgc_and_shared_for_adl(synth, tmp_path, method, layout, per_rank):  # noqa: F811
    """BGC's AttentiveDrop draws a field per image: two ranks (different images) must not share
    it; ADL's one draw per batch is the same on every rank. Either repeats for the same step."""
    import dataclasses

    trainer = Trainer(config(synth, tmp_path / "run", method=method, optim={"epochs": 1}, model={"layout": layout}),
                      progress=False)
    rank0 = trainer._draw_seed(3, 7)
    assert trainer._draw_seed(3, 7) == rank0 and trainer._draw_seed(3, 8) != rank0
    trainer.ctx = dataclasses.replace(trainer.ctx, rank=1, world=2)
    assert (trainer._draw_seed(3, 7) != rank0) == per_rank
    if per_rank:  # the drop field the model draws differs between the ranks on the same batch
        from mnpo.models.bgc import attentive_drop

        x = torch.rand(2, 4, 6, 6) + torch.linspace(0, 1, 36).view(1, 1, 6, 6)
        fields = []
        for rank in (0, 1):
            trainer.ctx = dataclasses.replace(trainer.ctx, rank=rank)
            g = torch.Generator().manual_seed(trainer._draw_seed(3, 7))
            fields.append(attentive_drop(x, 0.1, 0.5, g))
        assert not torch.equal(*fields)


def test_bgc_warms_up_at_its_own_batch_size_and_resumes_across_the_switch(synth, tmp_path):  # noqa: F811
    """method.bgc_warmup_batch_size (the authors' warm_batch_size): the warm-up epochs run at that
    batch, the later ones at optim.batch_size; a run stopped at the switch and resumed ends with
    the uninterrupted run's weights."""
    method = {"name": "bgc", "bgc_warmup_epochs": 1, "bgc_warmup_batch_size": 2}
    optim = {"epochs": 2, "lr_milestones": [1], "batch_size": 4}
    model = {"layout": "vgg16-bgc"}
    trainer = Trainer(config(synth, tmp_path / "full", method=method, optim=optim, model=model), progress=False)
    assert [trainer.batch_size(e) for e in (0, 1)] == [2, 4]
    assert trainer._loader(0).batch_size == 2 and trainer._loader(1).batch_size == 4
    sizes = []
    original = trainer._batch_loss

    def spy(batch, epoch, step):
        sizes.append((epoch, len(batch["label"])))
        return original(batch, epoch, step)

    trainer._batch_loss = spy
    trainer.fit()
    n = len(trainer.train_set)
    assert [s for e, s in sizes if e == 0] == [2] * (n // 2) + ([n % 2] if n % 2 else [])
    assert [s for e, s in sizes if e == 1] == [4] * (n // 4) + ([n % 4] if n % 4 else [])

    def stop(epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(config(synth, tmp_path / "cut", method=method, optim=optim, model=model), progress=False,
                on_epoch_end=stop).fit()
    Trainer(config(synth, tmp_path / "cut", method=method, optim=optim, model=model), resume=True,
            progress=False).fit()
    full, _ = load_model(tmp_path / "full" / "last.pt")
    cut, _ = load_model(tmp_path / "cut" / "last.pt")
    for (k, a), b in zip(full.state_dict().items(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # and it differs from a run at one batch size throughout
    Trainer(config(synth, tmp_path / "one", method={**method, "bgc_warmup_batch_size": None}, optim=optim,
                   model=model), progress=False).fit()
    one, _ = load_model(tmp_path / "one" / "last.pt")
    assert not torch.equal(one.classifier_main.weight, full.classifier_main.weight)


@pytest.mark.parametrize("sizes, key", [((4, 3), "method.bgc_warmup_batch_size 3"), ((5, 2), "optim.batch_size 5")])
def test_batch_sizes_must_split_over_the_processes(synth, tmp_path, monkeypatch, sizes, key):  # noqa: F811
    """Each global batch is split over the ranks: one that does not divide is named before any work."""
    from mnpo.engine import train as train_module
    from mnpo.engine.config import ConfigError
    from mnpo.engine.runtime import DistContext

    monkeypatch.setattr(train_module, "init_distributed", lambda device: DistContext(0, 2))
    cfg = config(synth, tmp_path / "run", method={"name": "bgc", "bgc_warmup_batch_size": sizes[1]},
                 optim={"epochs": 1, "batch_size": sizes[0]}, model={"layout": "vgg16-bgc"})
    with pytest.raises(ConfigError, match=f"{key} must be divisible by the 2 processes"):
        Trainer(cfg, progress=False)
