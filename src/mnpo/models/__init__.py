"""MNPO networks: backbones with named taps, layouts as data, weights and checkpoints."""

from __future__ import annotations

import os

import torch

from mnpo.models.backbones import ResNet50Backbone, VGG16Backbone, build_backbone
from mnpo.models.stages import TapInfo
from mnpo.models.inception import InceptionV3Backbone
from mnpo.models.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from mnpo.models.method_nets import MethodLayout, layout_from_dict, network_kind
from mnpo.models.multibranch import (
    LayoutError,
    MultiBranchNet,
    MultiBranchOutput,
    NetworkLayout,
    released_vgg16_layout,
    resnet50_layout,
    three_branch_vgg16_layout,
)
from mnpo.models.networks import LAYOUTS, build_network
from mnpo.models.release import import_released_checkpoint
from mnpo.models.weights import WeightsError, load_pretrained


def build_model(layout: NetworkLayout | MethodLayout | str, num_classes: int,
                pretrained: str | os.PathLike | None = None, width: float = 1.0,
                imagenet_classifier: bool = False) -> torch.nn.Module:
    """A ``MultiBranchNet`` (or ACoL / SPG network) from a layout (or a name in ``LAYOUTS``, built
    at ``width``).

    ``pretrained``: ``None`` (all randomly initialized), ``"imagenet"`` (torchvision's weights
    API) or a path to a torchvision ``.pth`` state dict; it fills the backbone, and with
    ``imagenet_classifier`` the classifier too (from the file's ``fc``, see ``load_pretrained``).
    """
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        layout = LAYOUTS[layout](width)
    model = build_network(layout, num_classes)
    if imagenet_classifier and pretrained is None:
        raise ValueError("imagenet_classifier needs pretrained weights to take the classifier from")
    if pretrained is not None:
        load_pretrained(model, pretrained, classifier=imagenet_classifier)
    return model


__all__ = [
    "LAYOUTS", "CheckpointError", "InceptionV3Backbone", "LayoutError", "MethodLayout", "MultiBranchNet",
    "MultiBranchOutput", "NetworkLayout", "build_network", "layout_from_dict", "network_kind",
    "ResNet50Backbone", "TapInfo", "VGG16Backbone", "WeightsError", "build_backbone", "build_model",
    "import_released_checkpoint", "load_model", "load_pretrained", "read_checkpoint",
    "released_vgg16_layout", "resnet50_layout", "save_checkpoint", "three_branch_vgg16_layout",
]
