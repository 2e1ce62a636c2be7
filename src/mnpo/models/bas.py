"""BAS, background activation suppression (Wu et al., CVPR 2022; ``modern-wsol.md`` section 2).

A classification head and a localization generator on the same backbone:

=============  ==================================  =================================  ==========
backbone       generator input ``x`` (stride 8)    classification path from ``x``     ``F``
=============  ==================================  =================================  ==========
vgg16          ``conv4_3`` (512)                   ``pool4``, ``conv5_1`` .. ``conv5_3``  stride 16
resnet50       ``layer3`` at stride 1 (1024)       2x2 max-pool, ``layer4`` (stride 1)  stride 16
inception_v3   ``Mixed_6e`` (768; no pool before   ``Mixed_7a`` (stride 2, padding 1),  stride 16
               ``Mixed_6a``: stride 8)             ``Mixed_7b``, ``Mixed_7c`` (2048)
=============  ==================================  =================================  ==========

(InceptionV3's ``Mixed_7*`` are torchvision's blocks, filled from its ImageNet weights as the
backbone is, with ``Mixed_7a``'s stride-2 convolutions and pool padded by 1 as the authors'.)

* the classification head ``cls``: conv3x3 -> 1024, ReLU, conv3x3 1024 -> 1024, ReLU,
  conv1x1 -> K, ReLU; ``F = cls(path(x))`` ``(B, K, h, w)`` and ``score1 = GAP(F)``;
* the generator: conv3x3 -> K, sigmoid, on ``x``: K foreground maps ``G`` ``(B, K, 2h, 2w)``;
  ``S = G[y]``, the label's (training);
* in training, with the labels: the background branch ``score_bg = GAP(cls(path(x.detach() *
  (1 - S))))`` through the classification path with its weights frozen (the live weights,
  detached, by ``torch.func.functional_call``: no gradient reaches them, no copy of the modules
  is made, and BatchNorm's running statistics are left alone, as the authors' copy leaves them),
  so its gradient reaches only the generator, through ``S``; and ``score2 = GAP(F *
  avgpool2x2(S))``.

``F`` is the map the CAM family reads at ``head``: GAP alone makes the scores, so the classifier
(:class:`IdentityScores`) is the identity, and CAM at ``head`` is ``F[y]``. The test map
(``compute_maps(..., "cam")``, :func:`bas_generator_maps`) is the generator's map of the target,
or the mean of the top-k predicted classes' maps (map option ``top_k``). The loss is
:func:`mnpo.engine.training_methods.bas_loss`.

Init of the new layers as the authors': on ResNet50 and InceptionV3 Xavier-uniform weights and
zero biases (their ``initialize_weights(..., 'xavier')``); on VGG16 weights from N(0, 0.02) and
PyTorch's default biases, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (their ``vgg.py: weight_init``,
which leaves biases alone). The backbone as the other networks (and InceptionV3's ``Mixed_7*``
with it: ImageNet weights fill both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mnpo.models.blocks import init_he
from mnpo.models.inception import mixed_7
from mnpo.models.method_nets import MethodLayout, MethodNet, gap
from mnpo.models.stages import scale_channels

#: (generator input, the classification path's last backbone tap) per backbone
BAS_TAPS = {"vgg16": ("conv4_3", "conv5_3"), "resnet50": ("layer3", None), "inception_v3": ("Mixed_6e", None)}
BAS_BACKBONES = tuple(BAS_TAPS)
#: the names of the features a training forward adds
BAS_TRAINING_FEATURES = ("bas_saliency", "bas_background", "bas_score2")


class IdentityScores(nn.Module):
    """The classifier of a network whose GAP output are the scores: ``(B, K) -> (B, K)``, with
    ``weight`` the identity ``(K, K)`` and ``bias`` zeros (non-persistent buffers, not trained,
    not saved), so the map methods that read a classifier after GAP read it here too."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(num_classes), persistent=False)
        self.register_buffer("bias", torch.zeros(num_classes), persistent=False)
        self.in_features = self.out_features = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return x


class BasNet(MethodNet):
    """``(B, 3, H, W) -> MultiBranchOutput(logits=(score1,))``; features ``head`` / ``main``
    (``F``), ``generator`` (``G``), on ResNet50 ``layer4`` (after BAS's pool) and, in training
    with ``labels``,
    ``bas_saliency`` (``S`` ``(B, 1, 2h, 2w)``), ``bas_background`` (the background branch's
    scores ``(B, K)``) and ``bas_score2`` ``(B, K)``."""

    head_features = ("main", "generator")

    def __init__(self, layout: MethodLayout, num_classes: int) -> None:
        if layout.network != "bas":
            raise ValueError(f"BasNet needs a bas layout, got network {layout.network!r}")
        if layout.backbone not in BAS_TAPS:
            raise ValueError(f"BAS is built on {BAS_BACKBONES}, not {layout.backbone!r}")
        # ResNet50: layer3 at stride 1 (BAS's large feature map), then BAS's own pool before layer4;
        # InceptionV3: no pool before Mixed_6a (stride 8), then Mixed_7* down to 16
        super().__init__(layout, num_classes, large_feature_map=layout.backbone in ("resnet50", "inception_v3"))
        self.generator_tap, self.path_tap = BAS_TAPS[layout.backbone]
        self._taps = tuple(t for t in BAS_TAPS[layout.backbone] if t is not None)
        if layout.backbone == "resnet50":  # layer4 runs after BAS's pool: BAS's feature, not a tap
            self.backbone.taps = {k: v for k, v in self.backbone.taps.items() if k != "layer4"}
            self.head_features = ("main", "generator", "layer4")
            path_channels = scale_channels(2048, layout.width)
        elif layout.backbone == "inception_v3":
            self.mixed7 = mixed_7(self.backbone.taps["Mixed_6e"].channels, layout.width, padding=1)
            self.head_features = ("main", "generator", "Mixed_7c")
            path_channels = self.mixed7.out_channels
        else:
            path_channels = self.backbone.taps[self.path_tap].channels
        in_ch = self.backbone.taps[self.generator_tap].channels
        hidden = scale_channels(1024, layout.width)
        self.cls_head = nn.Sequential(
            nn.Conv2d(path_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 1), nn.ReLU(inplace=True))
        self.generator = nn.Sequential(nn.Conv2d(in_ch, num_classes, 3, padding=1), nn.Sigmoid())
        for head in (self.cls_head, self.generator):
            if layout.backbone == "vgg16":
                init_normal_keep_bias(head, std=0.02)
            else:
                init_he(head, "xavier")
        self.scores = IdentityScores(num_classes)

    def classifier_for(self, branch: str) -> nn.Module:
        if branch != "main":
            raise KeyError(f"unknown branch {branch!r}; the BAS network has 'main'")
        return self.scores

    def pretrained_extras(self) -> dict[str, nn.Module]:
        """What ImageNet weights fill besides the backbone (``mnpo.models.weights.load_pretrained``)."""
        return {"Mixed_7": self.mixed7} if self.layout.backbone == "inception_v3" else {}

    def path_modules(self) -> nn.Module:
        """The modules between the generator's input and ``cls``: VGG16's ``pool4`` and ``conv5_*``
        (a slice of ``backbone.features``, sharing its modules), ResNet50's ``layer4``,
        InceptionV3's ``Mixed_7*``."""
        if self.layout.backbone == "resnet50":
            return self.backbone.layer4
        if self.layout.backbone == "inception_v3":
            return self.mixed7
        index = self.backbone._tap_index
        return self.backbone.features[index[self.generator_tap] + 1: index[self.path_tap] + 1]

    def _path(self, x: Tensor) -> Tensor:
        """``(B, C, 2h, 2w) -> (B, C', h, w)``: ResNet50's pool and layer4, InceptionV3's Mixed_7*
        (VGG16's path is the backbone's own pass)."""
        if self.layout.backbone == "inception_v3":
            return self.mixed7(x)
        return self.backbone.layer4(F.max_pool2d(x, 2))

    def background_scores(self, erased: Tensor) -> Tensor:
        """``GAP(cls(path(erased)))`` ``(B, K)`` with the live weights detached and BatchNorm's
        running statistics on copies: gradients flow to ``erased`` only."""
        modules = nn.ModuleDict({"path": self.path_modules(), "cls": self.cls_head})
        state = {name: p.detach() for name, p in modules.named_parameters()}
        state.update({name: b.clone() for name, b in modules.named_buffers()})
        x = F.max_pool2d(erased, 2) if self.layout.backbone == "resnet50" else erased
        x = functional_call(modules["path"], {k[5:]: v for k, v in state.items() if k.startswith("path.")}, (x,))
        x = functional_call(modules["cls"], {k[4:]: v for k, v in state.items() if k.startswith("cls.")}, (x,))
        return gap(x)

    def _heads(self, values, labels, run, mark):
        x = values[self.generator_tap]
        features = {}
        if self.path_tap is not None:
            path = values[self.path_tap]
        else:
            name = "layer4" if self.layout.backbone == "resnet50" else "Mixed_7c"
            path = features[name] = mark(name, run(self._path, x))
        head = features["main"] = mark("main", run(self.cls_head, path))
        score1 = run(gap, head)
        generator = features["generator"] = mark("generator", run(self.generator, x))
        if self.training and labels is not None:
            saliency = generator[torch.arange(len(labels), device=labels.device), labels][:, None]
            features["bas_saliency"] = saliency
            features["bas_background"] = self.background_scores(x.detach() * (1 - saliency))
            features["bas_score2"] = gap(head * F.avg_pool2d(saliency, 2))
        return (score1,), features


def init_normal_keep_bias(module: nn.Module, std: float) -> None:
    """Every convolution's weight from N(0, ``std``); biases keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)


def bas_generator_maps(generator: Tensor, logits: Tensor, targets: Tensor | None, top_k: int | None) -> Tensor:
    """BAS's test map at the generator's resolution ``(B, h, w)``: the map of ``targets`` (the
    predicted class without), or with ``top_k`` the mean of the maps of the ``top_k`` classes of
    highest ``logits`` (ties in PyTorch's ``topk`` order). ``generator`` ``(B, K, h, w)``."""
    if top_k is not None:
        if not 1 <= top_k <= generator.shape[1]:
            raise ValueError(f"map option top_k={top_k}: expected 1 .. {generator.shape[1]} (the classes)")
        classes = logits.topk(top_k, dim=1).indices
        return generator.gather(1, classes[:, :, None, None].expand(-1, -1, *generator.shape[2:])).mean(1)
    classes = logits.argmax(1) if targets is None else targets
    return generator[torch.arange(len(classes), device=classes.device), classes]
