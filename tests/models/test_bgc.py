"""BGC (``mnpo.models.bgc``, ``bgc_loss``): AttentiveDrop by hand, the network as the CAM
network plus an erased pass, the loss against a per-image float64 loop from the spec, the
warm-up switch, the optimizer groups."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnpo.engine.config import ConfigError, config_from_dict
from mnpo.engine.train import build_optimizer
from mnpo.engine.training_methods import BgcWeights, bgc_loss, class_similarity
from mnpo.maps import compute_maps
from mnpo.models import build_model
from mnpo.models.bgc import attentive_drop

BACKBONES = ("vgg16", "resnet50", "inception_v3")


def test_attentive_drop_by_hand():
    """Channel means 1, 2, 3, 4 on a 2 x 2 map, threshold 0.6: the pixels above 2.4 (means 3 and
    4) are dropped where their draw is <= prob; probability 1 drops both, 0 none; with a seeded
    generator the draws decide pixel by pixel."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 3, 2, 2).clone()
    x[:, 1] += 0.5
    x[:, 2] -= 0.5  # the channel mean stays 1, 2, 3, 4
    kept = attentive_drop(x, 0.6, 1.0)
    assert torch.equal(kept[0, :, 0], x[0, :, 0]) and not kept[0, :, 1].any()
    assert torch.equal(attentive_drop(x, 0.6, 0.0), x)
    draws = torch.rand((1, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    got = attentive_drop(x, 0.6, 0.5, torch.Generator().manual_seed(7))
    for r, c in ((1, 0), (1, 1)):
        dropped = bool(draws[0, 0, r, c] <= 0.5)
        assert torch.equal(got[0, :, r, c], torch.zeros(3) if dropped else x[0, :, r, c])
    assert torch.equal(attentive_drop(x, 1.0, 1.0), x)  # nothing exceeds the maximum itself


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_network_is_the_cam_network_plus_an_erased_pass(backbone):
    """With the CAM network's weights (the same names but head and classifier) it gives the CAM
    network's logits and CAM; in training with labels, the erased pass is the shared layers on
    the dropped features; none of it in eval."""
    torch.manual_seed(0)
    bgc = build_model(f"{backbone}-bgc", 4, width=1 / 16).double().eval()
    # InceptionV3 (ours): wsolevaluation's InceptionCam head without its dropouts
    cam_layout = "inception_v3-cam-no-dropout" if backbone == "inception_v3" else f"{backbone}-cam"
    cam = build_model(cam_layout, 4, width=1 / 16).double().eval()
    rename = {"head.conv.": "branches.main.head.conv.", "head.0.conv.": "branches.main.SPG_A3_1b.conv.",
              "head.1.conv.": "branches.main.SPG_A3_2b.conv.", "classifier_main.": "classifier."}
    state = {next((v + k[len(p):] for p, v in rename.items() if k.startswith(p)), k): t
             for k, t in bgc.state_dict().items()}
    cam.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(bgc(x).logits[0], cam(x).logits[0], rtol=1e-12, atol=1e-12)
        assert "bgc_erased" not in bgc(x, return_features=True, labels=y).features
    torch.testing.assert_close(compute_maps(bgc, x, y, method="cam")[0], compute_maps(cam, x, y, method="cam")[0],
                               rtol=0, atol=1e-10)
    bgc.train()
    bgc.drop_threshold, bgc.drop_prob = 0.5, 1.0
    out = bgc(x, return_features=True, labels=y)
    if backbone == "resnet50":
        dropped = attentive_drop(out.features["layer4.0"], 0.5, 1.0)
    else:
        tap = "Mixed_6a" if backbone == "inception_v3" else "conv4_3"
        with torch.no_grad():
            before = bgc.backbone(x, (tap,))[tap]
        dropped = attentive_drop(before, 0.5, 1.0)
    torch.testing.assert_close(out.features["bgc_erased"], bgc.shared_layers(dropped), rtol=1e-12, atol=1e-12)
    assert not torch.equal(out.features["bgc_erased"], out.features["main"])


def naive_bgc_loss(logits, head, erased, weight, labels, w, dataset, warm):
    """The spec's loss, image by image in float64 NumPy."""
    n = len(labels)
    ce = 0.0
    for b in range(n):
        row = logits[b]
        ce += np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[b]]
    loss = ce / n + w.lambda_drop * np.abs(head - erased).mean()
    if warm:
        return loss
    unit_w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    loss_sim = loss_norm = 0.0
    for b in range(n):
        f = head[b].reshape(head.shape[1], -1)  # (C, P)
        norms = np.linalg.norm(f, axis=0)
        sim = unit_w @ (f / np.maximum(norms, 1e-12))  # (K, P)
        nn = (norms - norms.min()) / (norms.max() - norms.min() + 1e-15)
        s_y = sim[labels[b]]

        def mean(v, m):
            return (v * m).sum() / (m.sum() + 1e-15)

        loss_sim += mean(s_y, nn < w.bg_threshold) - mean(s_y, nn > w.fg_threshold)
        pick = sim.max(0) if dataset == "cub" else s_y
        loss_norm += mean(nn, pick < 0) - mean(nn, pick > 0)
    return loss + w.lambda_sim * loss_sim / n + w.lambda_norm * loss_norm / n


@pytest.mark.parametrize("dataset", ["cub", "ilsvrc"])
@pytest.mark.parametrize("warm", [True, False])
def test_bgc_loss_equals_the_naive_per_image_version(dataset, warm):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    head = torch.rand(3, 6, 4, 4, generator=g, dtype=torch.float64) * 2 - 0.5
    erased = torch.rand(3, 6, 4, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2])
    w = BgcWeights(0.5, 0.6, 0.1, 0.15, 3.0)
    got = bgc_loss(logits, {"main": head, "bgc_erased": erased}, labels, weight, w, dataset, warm)
    want = naive_bgc_loss(logits.numpy(), head.numpy(), erased.numpy(), weight.numpy(), labels.numpy(), w,
                          dataset, warm)
    assert got.dtype == torch.float64 and abs(float(got) - want) < 1e-12


def test_the_norm_loss_branch_differs_between_cub_and_ilsvrc():
    g = torch.Generator().manual_seed(5)
    features = {"main": torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64),
                "bgc_erased": torch.zeros(2, 6, 4, 4, dtype=torch.float64)}
    args = (torch.zeros(2, 5, dtype=torch.float64), features, torch.tensor([1, 2]),
            torch.randn(5, 6, generator=g, dtype=torch.float64), BgcWeights(0.0, 0.6, 0.1, 1.0, 0.0))
    assert float(bgc_loss(*args, "cub")) != float(bgc_loss(*args, "ilsvrc"))
    with pytest.raises(ValueError, match="BGC data set 'voc'"):
        bgc_loss(*args, "voc")


def test_class_similarity_is_the_cosine():
    f = torch.tensor([[[[3.0]], [[4.0]]]])  # one pixel, feature (3, 4)
    w = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    torch.testing.assert_close(class_similarity(f, w)[0, :, 0, 0], torch.tensor([0.6, -0.8]))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bgc_optimizer_groups_are_the_authors(backbone, tmp_path):
    """ResNet50: the classifier alone at the classifier rate (x10); VGG16: the head and the
    classifier (x5), the backbone at lr; InceptionV3 (ours) as VGG16."""
    ratio = 10 if backbone == "resnet50" else 5
    cfg = config_from_dict({"data": {"root": str(tmp_path), "metadata": str(tmp_path)},
                            "model": {"layout": f"{backbone}-bgc", "width": 0.0625, "pretrained": None},
                            "method": {"name": "bgc"}, "optim": {"lr": 0.002, "new_layer_lr_ratio": ratio}})
    model = build_model(f"{backbone}-bgc", 4, width=1 / 16)
    groups = build_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    new = {names[id(p)] for p in groups[1]["params"]}
    expected = {"classifier_main.weight", "classifier_main.bias"}
    if backbone == "vgg16":
        expected |= {"head.conv.weight", "head.conv.bias"}
    if backbone == "inception_v3":
        expected |= {f"head.{i}.conv.{k}" for i in (0, 1) for k in ("weight", "bias")}
    assert new == expected and groups[1]["lr"] == pytest.approx(0.002 * ratio)


def test_bgc_settings_default_to_the_authors_and_are_validated(tmp_path):
    base = {"data": {"root": str(tmp_path), "metadata": str(tmp_path)},
            "model": {"layout": "vgg16-bgc", "width": 0.0625, "pretrained": None}}
    cfg = config_from_dict({**base, "method": {"name": "bgc", "bgc_lambda_norm": 0.3}})
    assert cfg.method.bgc_weights_for("vgg16") == BgcWeights(0.5, 0.6, 0.1, 0.3, 3.0)
    assert cfg.method.bgc_weights_for("resnet50") == BgcWeights(0.5, 0.4, 0.2, 0.3, 2.0)
    assert cfg.method.bgc_drop_for("resnet50") == (0.8, 0.25) and cfg.method.bgc_warmup_epochs == 20
    # InceptionV3, which the authors did not train: ResNet50's settings (ours)
    assert cfg.method.bgc_weights_for("inception_v3") == BgcWeights(0.5, 0.4, 0.2, 0.3, 2.0)
    assert cfg.method.bgc_drop_for("inception_v3") == (0.8, 0.25)
    for method, message in (({"bgc_dataset": "voc"}, r"method.bgc_dataset: 'voc'; choose one of \('cub', 'ilsvrc'\)"),
                            ({"bgc_drop_prob": 1.5}, r"method.bgc_drop_prob: must be in \[0, 1\]"),
                            ({"bgc_lambda_sim": -1.0}, "method.bgc_lambda_sim: must be >= 0"),
                            ({"bgc_warmup_epochs": -1}, "method.bgc_warmup_epochs: must be >= 0"),
                            ({"bgc_warmup_batch_size": 0}, r"method.bgc_warmup_batch_size: must be >= 1 \(or null")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**base, "method": {"name": "bgc", **method}})
    with pytest.raises(ConfigError, match="'vgg16-cam' is not a bgc network; method 'bgc' needs 'vgg16-bgc'"):
        config_from_dict({**base, "model": {**base["model"], "layout": "vgg16-cam"}, "method": {"name": "bgc"}})


def test_the_erased_pass_trains_the_shared_layers():
    """The drop term's gradient reaches the layers both passes share (conv5_3 on VGG16)."""
    torch.manual_seed(1)
    model = build_model("vgg16-bgc", 3, width=1 / 16).train()
    model.drop_prob = 1.0
    out = model(torch.randn(2, 3, 64, 64), return_features=True, labels=torch.tensor([0, 2]))
    drop_term = F.l1_loss(out.features["main"], out.features["bgc_erased"])
    (grad,) = torch.autograd.grad(drop_term, [model.backbone.features[28].weight])
    assert grad.abs().sum() > 0
