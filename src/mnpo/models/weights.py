"""ImageNet weights for the backbones: torchvision's weights API (timm's for DeiT) online, a local file offline.

Both sources hold a *torchvision* model's state dict (``features.N.*`` for VGG16,
``conv1``/``bn1``/``layerI.J.*`` for ResNet50, ``Conv2d_*``/``Mixed_*`` for InceptionV3). Our
backbones keep torchvision's module names, so the mapping is the identity on the backbone's
tensors; what the WSOL backbones do not have is dropped on purpose: the ImageNet classifier
(``classifier.*`` / ``fc.*``) and, for InceptionV3, ``AuxLogits.*`` and ``Mixed_7*`` (as
wsolevaluation drops them). A DeiT takes timm's (and the official DeiT files') state dict, whose
names ours keep too (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm``),
less its ImageNet ``head``. Every other difference fails the load with the names listed: a
backbone that silently keeps random weights is the failure this module exists to prevent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from mnpo.models.checkpoint import CheckpointError, load_plain, load_state_dict_strict
from mnpo.models.deit import DEIT_NAMES, TIMM_NAMES

IMAGENET = "imagenet"
#: torchvision weight enums used for ``pretrained="imagenet"`` (V1: the weights WSOL papers use).
TORCHVISION_WEIGHTS = {
    "vgg16": ("VGG16_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "inception_v3": ("Inception_V3_Weights", "IMAGENET1K_V1"),
}
#: Tensors of the torchvision source that our backbones do not have (the ImageNet classifier;
#: InceptionV3's auxiliary classifier and its stride-32 blocks, absent in the WSOL layout).
DROPPED_PREFIXES = {"vgg16": ("classifier.",), "resnet50": ("fc.",), "inception_v3": ("AuxLogits.", "Mixed_7", "fc."),
                    **{name: ("head.",) for name in DEIT_NAMES}}
#: the official DeiT ImageNet files (``{"model": state dict}``), for machines without timm or a network
DEIT_URLS = {
    "deit_tiny": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit_base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}


class WeightsError(CheckpointError):
    """Pretrained weights that do not fit a backbone, or that could not be fetched."""


def imagenet_state_dict(backbone: str, progress: bool = True) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict for ``backbone`` (downloaded once to the torch hub cache)."""
    if backbone in DEIT_NAMES:
        return timm_state_dict(backbone)
    import torchvision.models as tvm

    if backbone not in TORCHVISION_WEIGHTS:
        raise WeightsError(f"no ImageNet weights known for backbone {backbone!r}")
    enum_name, member = TORCHVISION_WEIGHTS[backbone]
    weights = getattr(getattr(tvm, enum_name), member)
    try:
        return weights.get_state_dict(progress=progress)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise WeightsError(
            f"could not download {enum_name}.{member} from {weights.url} ({err}); on a machine "
            "without internet, download that file elsewhere and pass its path instead of 'imagenet'"
        ) from None


def timm_state_dict(backbone: str) -> dict[str, Tensor]:
    """timm's ImageNet DeiT (``deit_small_patch16_224`` ...) state dict, through ``timm.create_model``."""
    try:
        import timm
    except ImportError:
        raise WeightsError(f"pretrained: imagenet on {backbone} needs timm (pip install timm), or pass the "
                           f"official file instead: {DEIT_URLS[backbone]}") from None
    try:
        return timm.create_model(TIMM_NAMES[backbone], pretrained=True).state_dict()
    except OSError as err:  # no network, no hub cache
        raise WeightsError(f"timm could not fetch {TIMM_NAMES[backbone]} ({err}); on a machine without internet, "
                           f"download {DEIT_URLS[backbone]} elsewhere and pass its path instead of 'imagenet'") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``.pth`` file: a bare one, or under ``state_dict`` / ``model``.

    A ``module.`` prefix (DataParallel) is removed. Loaded with ``weights_only=True``.
    """
    obj = load_plain(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict (names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{path}: not a state dict: entries {bad[:5]} are not name -> tensor")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_backbone_weights(backbone: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copy a torchvision state dict into ``backbone`` (one of ``BACKBONE_NAMES``, at width 1).

    Fails with ``WeightsError`` listing every missing, unexpected or mis-shaped tensor.
    BatchNorm's ``num_batches_tracked`` counters may be absent (old files); they stay 0.
    """
    dropped = DROPPED_PREFIXES.get(backbone.name, ())
    kept = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
    for name, value in backbone.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in kept:
            kept[name] = value
    for name in getattr(backbone, "new_parameters", ()):  # SAT's localization token: not in ImageNet files
        if name not in kept:
            kept[name] = backbone.state_dict()[name]
    try:
        load_state_dict_strict(backbone, kept, source)
    except CheckpointError as err:
        if backbone.name in DEIT_NAMES:
            raise WeightsError(f"{err} (expected a timm / official DeiT {backbone.name} state dict at width 1; "
                               "a distilled DeiT, with dist_token, is another network)") from None
        raise WeightsError(f"{err} (expected a torchvision {backbone.name} state dict at width 1)") from None


def load_pretrained(model: nn.Module, source: str | os.PathLike, progress: bool = True,
                    classifier: bool = False) -> None:
    """Load ImageNet weights into ``model.backbone``: ``source`` is ``"imagenet"`` or a file path.

    A network with ``pretrained_extras()`` (``{source prefix: module}``: BAS's InceptionV3 and its
    ``Mixed_7*`` blocks) has those modules filled from the same file too, under the same names.
    The new layers (branches, head, classifier) keep their initialization, except with
    ``classifier``: the main classifier then takes the source's ImageNet classifier (``fc``),
    which must have its shape: wsolevaluation starts its ILSVRC ResNet50 CAM, HaS, CutMix and
    ADL networks from it (``Linear(2048, 1000)``).
    """
    backbone = model.backbone
    if str(source) == IMAGENET:
        state = imagenet_state_dict(backbone.name, progress)
        name = f"{'timm' if backbone.name in DEIT_NAMES else 'torchvision'} {backbone.name} ImageNet weights"
    else:
        state, name = read_state_dict(source), str(Path(source))
    load_backbone_weights(backbone, state, name)
    for prefix, module in getattr(model, "pretrained_extras", dict)().items():
        extra = {k: v for k, v in state.items() if k.startswith(prefix)}
        for key, value in module.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in extra:
                extra[key] = value
        try:
            load_state_dict_strict(module, extra, name)
        except CheckpointError as err:
            raise WeightsError(f"{err} (the network's {prefix}* blocks, from a torchvision {backbone.name} "
                               "state dict at width 1)") from None
    if classifier:
        load_imagenet_classifier(model, state, name)


def load_imagenet_classifier(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copy ``fc.weight`` / ``fc.bias`` of a torchvision state dict into ``model.classifier``."""
    target = model.classifier
    missing = [k for k in ("fc.weight", "fc.bias") if k not in state_dict]
    if missing:
        raise WeightsError(f"{source}: no ImageNet classifier to start from ({missing} missing); only "
                           "torchvision ResNet50 and InceptionV3 files have an 'fc'")
    shapes = (tuple(state_dict["fc.weight"].shape), tuple(target.weight.shape))
    if shapes[0] != shapes[1]:
        raise WeightsError(f"{source}: its ImageNet classifier fc.weight is {shapes[0]}, the network's classifier "
                           f"is {shapes[1]}; only a network with a Linear({shapes[0][1]}, {shapes[0][0]}) "
                           "classifier (ResNet50 CAM on 1000 classes) can start from it")
    with torch.no_grad():
        target.weight.copy_(state_dict["fc.weight"])
        target.bias.copy_(state_dict["fc.bias"])
