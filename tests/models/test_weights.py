import urllib.error

import pytest
import torch
import torchvision
from numerics import network_bound
import torchvision.models._api as tv_api
from torchvision.models import ResNet50_Weights, VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from mnpo.models import build_model
from mnpo.models.weights import WeightsError, load_backbone_weights, load_pretrained, read_state_dict
from tiny_models import spread_batchnorm


@pytest.fixture(scope="module")
def vgg_state():
    """A random torchvision VGG16 state dict; the 120 M-parameter ImageNet classifier is stood in
    for by small tensors under the same names (they must be dropped whatever they hold)."""
    torch.manual_seed(1)
    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({"classifier.0.weight": torch.zeros(4, 8), "classifier.6.bias": torch.zeros(1000)})
    return state


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(2)
    return spread_batchnorm(torchvision.models.resnet50(weights=None), affine=True).state_dict()


def test_vgg16_every_backbone_tensor_from_a_local_file(tmp_path, vgg_state):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg_state, path)
    model = build_model("vgg16-mnpo", 10)
    head_before = model.branches["main"]["head"].conv.weight.clone()
    load_pretrained(model, path)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, vgg_state[name]), name
    # the new layers keep their He initialization
    assert torch.equal(model.branches["main"]["head"].conv.weight, head_before)


def test_vgg16_taps_equal_torchvision_features(vgg_state):
    model = build_model("vgg16-mnpo", 3)
    load_backbone_weights(model.backbone, vgg_state, "test")
    tv = make_layers(cfgs["D"])
    tv.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")})
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():  # like with like: both in float64, rounding bounded by numerics.py
        taps = model.backbone.double()(x, ["conv4_2", "conv5_3"])
        tv.double()
        for name, end in (("conv4_2", 21), ("conv5_3", 30)):  # index 20: the ReLU after conv4_2
            expected = tv[:end](x)
            bound = network_bound(tv[:end], torch.float64) * float(expected.abs().max())
            torch.testing.assert_close(taps[name], expected, rtol=0, atol=bound)


def test_resnet50_every_backbone_tensor_and_same_features_up_to_layer3(tmp_path, resnet_state):
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet_state.items()}}, path)  # DataParallel style
    model = build_model("resnet50-mnpo", 10, pretrained=path).eval()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, resnet_state[name]), name
    tv = torchvision.models.resnet50(weights=None).eval()
    tv.load_state_dict(resnet_state)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # like with like: both in float64, rounding bounded by numerics.py
        ours = model.backbone.double()(x, ["layer3", "layer4"])
        tv.double()
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        torch.testing.assert_close(ours["layer3"], ref, rtol=0, atol=network_bound(tv, torch.float64) * float(ref.abs().max()))
        assert ours["layer4"].shape[-1] == 4  # stride 16: layer4 keeps layer3's resolution


def test_num_batches_tracked_may_be_absent(tmp_path, resnet_state):
    state = {k: v for k, v in resnet_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    model = build_model("resnet50-mnpo", 2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    load_pretrained(model, path)
    loaded = model.backbone.state_dict()
    for name, value in state.items():  # every tensor the file has, loaded as it is there
        if name in loaded:
            assert torch.equal(loaded[name], value), name
    assert sum(name in loaded for name in state) == len(loaded) - len(before)  # all but the counters
    for name, value in before.items():  # the counters the file lacks keep their value
        assert torch.equal(loaded[name], value), name


def test_imagenet_goes_through_torchvision_weights_api(monkeypatch, vgg_state, resnet_state):
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return vgg_state if "vgg16" in url else resnet_state

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    vgg = build_model("vgg16-mnpo", 4, pretrained="imagenet")
    resnet = build_model("resnet50-mnpo", 4, pretrained="imagenet")
    assert urls == [VGG16_Weights.IMAGENET1K_V1.url, ResNet50_Weights.IMAGENET1K_V1.url]
    assert torch.equal(vgg.backbone.features[28].weight, vgg_state["features.28.weight"])
    assert torch.equal(resnet.backbone.layer4[2].conv3.weight, resnet_state["layer4.2.conv3.weight"])


def test_offline_imagenet_says_how_to_use_a_local_file(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsError, match=r"could not download VGG16_Weights.IMAGENET1K_V1 from https://.*pass its path"):
        build_model("vgg16-mnpo", 4, pretrained="imagenet")


def test_every_mismatch_is_listed(tmp_path, vgg_state):
    state = dict(vgg_state)
    del state["features.28.weight"], state["features.0.bias"]
    state["features.40.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_model("vgg16-mnpo", 2), path)
    text = str(info.value)
    assert str(path) in text
    assert "missing: backbone" not in text  # names are the backbone's own, as in the file
    assert "missing: features.0.bias, features.28.weight" in text
    assert "unexpected: features.40.weight" in text


def test_reduced_width_cannot_take_imagenet_weights(tmp_path, vgg_state):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg_state, path)
    with pytest.raises(WeightsError, match=r"wrong shape: features.0.weight \(64, 3, 3, 3\) \(model has \(16, 3, 3, 3\)\)"):
        build_model("vgg16-mnpo", 2, pretrained=path, width=0.25)


def test_resnet_weights_do_not_fit_vgg(tmp_path, resnet_state):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet_state, path)
    with pytest.raises(WeightsError, match="missing: features.0.weight.*unexpected: conv1.weight"):
        load_pretrained(build_model("vgg16-mnpo", 2), path)


def test_read_state_dict_rejects_what_is_not_one(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="list.pth: expected a state dict.*list"):
        read_state_dict(path)
    torch.save({"epoch": 3, "w": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"not a state dict: entries \['epoch'\]"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")


def test_unknown_layout_name():
    with pytest.raises(ValueError, match="unknown layout 'vgg19-mnpo'"):
        build_model("vgg19-mnpo", 2)


def test_imagenet_classifier_of_resnet50(tmp_path, resnet_state):
    """wsolevaluation's ILSVRC ResNet50 CAM starts from the ImageNet fc: ``imagenet_classifier``
    copies it; a classifier of another shape, or a file without ``fc``, is refused by name."""
    path = tmp_path / "resnet50.pth"
    torch.save(resnet_state, path)
    model = build_model("resnet50-cam", 1000, pretrained=str(path), imagenet_classifier=True)
    assert torch.equal(model.classifier.weight, resnet_state["fc.weight"])
    assert torch.equal(model.classifier.bias, resnet_state["fc.bias"])
    plain = build_model("resnet50-cam", 1000, pretrained=str(path))
    assert not torch.equal(plain.classifier.weight, resnet_state["fc.weight"])
    with pytest.raises(WeightsError, match=r"fc.weight is \(1000, 2048\), the network's classifier is \(200, 2048\)"):
        build_model("resnet50-cam", 200, pretrained=str(path), imagenet_classifier=True)
    with pytest.raises(ValueError, match="imagenet_classifier needs pretrained weights"):
        build_model("resnet50-cam", 1000, imagenet_classifier=True)


def test_vgg16_has_no_imagenet_classifier_to_start_from(tmp_path, vgg_state):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg_state, path)
    with pytest.raises(WeightsError, match=r"no ImageNet classifier to start from \(\['fc.weight', 'fc.bias'\] missing\)"):
        build_model("vgg16-cam", 1000, pretrained=str(path), imagenet_classifier=True)
