"""`--model SPEC`: classifiers that are not mnpo's (torchvision, timm, a factory), their weights
files, and the wrapper the engine evaluates."""

import sys
import textwrap

import pytest
import torch
import torchvision

from mnpo.maps import compute_maps
from mnpo.models.external import ExternalClassifier, ModelSpecError, build_external, parse_spec

FACTORIES = '''
import torch
from torch import nn


def tiny(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def ignores_the_class_count(num_classes=5):
    return tiny(7)


def not_a_module():
    return "resnet"
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """A module ``mnpo_test_factories`` on ``sys.path`` with three factories."""
    root = tmp_path_factory.mktemp("factories")
    (root / "mnpo_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    sys.path.insert(0, str(root))
    yield "mnpo_test_factories"
    sys.path.remove(str(root))
    sys.modules.pop("mnpo_test_factories", None)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path_factory.mktemp("weights") / "r18.pt"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.mark.parametrize("spec, parsed", [("torchvision:resnet50", ("torchvision", "resnet50")),
                                          ("timm:vit_small_patch16_224", ("timm", "vit_small_patch16_224")),
                                          ("module:pkg.mod.make", ("module", "pkg.mod.make"))])
def test_parse_spec(spec, parsed):
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["resnet50", "torchvision:", "hub:resnet50", ":resnet50", ""])
def test_parse_spec_refuses_what_it_cannot_build(spec):
    with pytest.raises(ModelSpecError, match="expected torchvision:NAME, timm:NAME or module:path.to.factory"):
        parse_spec(spec)


def test_torchvision_model_from_a_state_dict_file(resnet18_weights):
    net, path = resnet18_weights
    model = build_external("torchvision:resnet18", path, num_classes=3, input_size=32)
    assert isinstance(model, ExternalClassifier) and not model.training
    assert model.num_classes == 3 and model.class_names is None  # ImageNet's names only fit 1000 classes
    assert model.wrapped_classifier is model.net
    for (name, loaded), saved in zip(model.net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(loaded, saved), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert len(out.logits) == 1 and torch.equal(out.logits[0], net(x))


def test_a_checkpoint_dict_around_the_state_dict_is_read(resnet18_weights, tmp_path):
    net, _ = resnet18_weights
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    model = build_external("torchvision:resnet18", tmp_path / "wrapped.pt", num_classes=3, input_size=32)
    assert torch.equal(model.net.fc.weight, net.fc.weight)


def test_imagenet_weights_come_from_the_weights_api_with_their_class_names(monkeypatch):
    """No download here: ``get_model`` is replaced, and asked for the DEFAULT weights."""
    asked = {}

    def get_model(name, weights=None, **kwargs):
        asked.update(name=name, weights=weights, **kwargs)
        return torchvision.models.resnet18()

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    model = build_external("torchvision:resnet18", input_size=32)
    default = torchvision.models.ResNet18_Weights.DEFAULT
    assert asked == {"name": "resnet18", "weights": default}
    assert model.num_classes == 1000 and model.class_names == list(default.meta["categories"])
    assert model.class_names[0] == "tench"


def test_torchvision_refusals(resnet18_weights, tmp_path):
    net, path = resnet18_weights
    with pytest.raises(ModelSpecError, match="torchvision has no model 'resnet17'"):
        build_external("torchvision:resnet17")
    with pytest.raises(ModelSpecError, match="resnet18 with 3 classes has no published weights; pass --weights"):
        build_external("torchvision:resnet18", num_classes=3)
    with pytest.raises(ModelSpecError, match="num_classes must be a positive int, got 0"):
        build_external("torchvision:resnet18", path, num_classes=0)
    with pytest.raises(ModelSpecError, match=f"{tmp_path / 'none.pt'}: weights file not found"):
        build_external("torchvision:resnet18", tmp_path / "none.pt", num_classes=3)


def test_a_weights_file_that_does_not_fit_is_refused_with_what_differs(resnet18_weights, tmp_path):
    net, path = resnet18_weights
    with pytest.raises(ModelSpecError) as err:  # 3-class weights into the 1000-class model
        build_external("torchvision:resnet18", path)
    assert str(err.value).startswith(f"{path}: does not fit the model: shape mismatch 2")
    assert "fc.weight: file (3, 512), model (1000, 512); --num-classes?" in str(err.value)
    state = net.state_dict()
    state["head.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ModelSpecError, match=r"missing 1 \(e.g. \['fc.weight'\]\); unexpected 1 \(e.g. \['head.weight'\]\)"):
        build_external("torchvision:resnet18", tmp_path / "renamed.pt", num_classes=3)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelSpecError, match=f"{tmp_path / 'list.pt'}: expected a state dict .* got list"):
        build_external("torchvision:resnet18", tmp_path / "list.pt", num_classes=3)
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module: not loaded
    with pytest.raises(ModelSpecError, match=f"{tmp_path / 'pickled.pt'}: not a state dict torch.load can read safely"):
        build_external("torchvision:resnet18", tmp_path / "pickled.pt", num_classes=3)


def test_a_factory_by_module_path(factories, tmp_path):
    torch.manual_seed(0)
    model = build_external(f"module:{factories}.tiny", num_classes=4, input_size=16)
    assert model.num_classes == 4 and model.net[-1].out_features == 4
    assert build_external(f"module:{factories}.tiny", input_size=16).num_classes == 5  # its own default
    torch.save(model.net.state_dict(), tmp_path / "tiny.pt")
    again = build_external(f"module:{factories}.tiny", tmp_path / "tiny.pt", num_classes=4, input_size=16)
    assert torch.equal(again.net[0].weight, model.net[0].weight)


def test_factory_refusals(factories):
    with pytest.raises(ModelSpecError, match="gives 7 scores, not --num-classes 4"):
        build_external(f"module:{factories}.ignores_the_class_count", num_classes=4, input_size=16)
    with pytest.raises(ModelSpecError, match=f"module:{factories}.not_a_module returned str, not an nn.Module"):
        build_external(f"module:{factories}.not_a_module", input_size=16)
    with pytest.raises(ModelSpecError, match=f"module:{factories}.absent: cannot import it .*AttributeError"):
        build_external(f"module:{factories}.absent")
    with pytest.raises(ModelSpecError, match="module:no_such_package.make: cannot import it .*ModuleNotFoundError"):
        build_external("module:no_such_package.make")
    with pytest.raises(ModelSpecError, match="module:tiny: expected module:package.module.factory"):
        build_external("module:tiny")


def test_timm_without_timm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelSpecError, match="timm:NAME needs timm"):
        build_external("timm:resnet50")


def test_timm_models_are_built_by_timm(monkeypatch, factories):
    """With a stand-in ``timm``: ``create_model(name, pretrained=..., num_classes=...)``, and a
    weights file means ``pretrained=False`` and a strict load."""
    import types

    import mnpo_test_factories

    calls = []
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, pretrained, **kw: calls.append((name, pretrained, kw)) or \
        mnpo_test_factories.tiny(kw.get("num_classes", 5))
    monkeypatch.setitem(sys.modules, "timm", fake)
    assert build_external("timm:tiny_net", input_size=16).num_classes == 5
    assert build_external("timm:tiny_net", num_classes=2, input_size=16).num_classes == 2
    assert calls == [("tiny_net", True, {}), ("tiny_net", True, {"num_classes": 2})]


def test_maps_of_the_wrapper_are_the_classifiers_own_by_its_layer_names(resnet18_weights):
    """The map methods hook the wrapped classifier: ``layer4``, not ``net.layer4``."""
    net, path = resnet18_weights
    model = build_external("torchvision:resnet18", path, num_classes=3, input_size=64)
    x, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    for method in ("gradcam", "eigencam"):
        wrapped, wrapped_logits = compute_maps(model, x, t, method=method, target_layer="layer3")
        own, own_logits = compute_maps(net, x, t, method=method, target_layer="layer3")
        assert torch.equal(wrapped, own) and torch.equal(wrapped_logits, own_logits), method
