"""MNPO multi-branch networks built from a layout (data, not code).

A ``NetworkLayout`` names a backbone, a width multiplier and the branches. Each
``BranchLayout`` is a list of ``BlockSpec``; a block's inputs are backbone taps
(``"conv4_2"``), earlier blocks of the same branch (``"a"``) or blocks of earlier
branches (``"parallel.ab"``). A branch's output is its last block (or ``output``, which
may name a tap). The first branch is the main branch (classification uses its logits).
Every branch output goes through GAP and the *same* ``Linear(C, K)`` classifier.

Channel counts in a layout are full-width numbers; the network scales them by ``width``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mnpo.models.backbones import backbone_taps, build_backbone
from mnpo.models.stages import TapInfo, gradient_leaf, run_tracked, scale_channels
from mnpo.models.blocks import Bottleneck, Conv3x3ReLU, Reduce1x1, concat, init_he

BLOCK_KINDS = ("bottleneck", "reduce1x1", "conv3x3_relu", "concat")


class LayoutError(ValueError):
    """A layout that cannot be built; the message names the branch and block."""


def check_layout_keys(data: Mapping[str, Any], allowed: set[str]) -> None:
    """Refuse a layout dict with keys outside ``allowed``, or a ``large_feature_map`` that is not
    a bool (``bool("false")`` is true)."""
    unknown = set(data) - allowed
    if unknown:
        raise LayoutError(f"unknown layout keys {sorted(unknown)}; known: {sorted(allowed)}")
    if not isinstance(data.get("large_feature_map", False), bool):
        raise LayoutError(f"large_feature_map must be true or false, got {data['large_feature_map']!r}")


@dataclass(frozen=True)
class BlockSpec:
    """One fusion block.

    kind: ``bottleneck`` (needs ``width``, ``out_channels``, optional ``stride``),
    ``reduce1x1`` / ``conv3x3_relu`` (need ``out_channels``), ``concat`` (>= 2 inputs).
    input_dropout, dropout: probabilities of dropout (``F.dropout``, training mode only) on the
    block's input and on its output (0: none; wsolevaluation's InceptionCam head has them).
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    out_channels: int | None = None
    width: int | None = None
    stride: int = 1
    input_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        where = f"block {self.name!r}"
        if not self.name or "." in self.name:
            raise LayoutError(f"{where}: a block name must be non-empty and contain no '.'")
        if self.kind not in BLOCK_KINDS:
            raise LayoutError(f"{where}: unknown kind {self.kind!r}; choose one of {BLOCK_KINDS}")
        if self.kind == "concat":
            if len(self.inputs) < 2:
                raise LayoutError(f"{where}: concat needs at least 2 inputs, got {list(self.inputs)}")
        elif len(self.inputs) != 1:
            raise LayoutError(f"{where}: {self.kind} takes exactly 1 input, got {list(self.inputs)}")
        if self.kind != "concat" and (self.out_channels is None or self.out_channels < 1):
            raise LayoutError(f"{where}: {self.kind} needs out_channels >= 1")
        if self.kind == "bottleneck" and (self.width is None or self.width < 1):
            raise LayoutError(f"{where}: bottleneck needs width >= 1")
        if self.stride not in (1, 2):
            raise LayoutError(f"{where}: stride must be 1 or 2, got {self.stride}")
        if self.stride != 1 and self.kind != "bottleneck":
            raise LayoutError(f"{where}: only a bottleneck may have a stride")
        for key in ("input_dropout", "dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise LayoutError(f"{where}: {key} must be in [0, 1), got {getattr(self, key)}")


@dataclass(frozen=True)
class BranchLayout:
    """A branch: its blocks in order and its output (default: the last block)."""

    name: str
    blocks: tuple[BlockSpec, ...] = ()
    output: str | None = None

    def __post_init__(self) -> None:
        blocks = tuple(b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in self.blocks)
        object.__setattr__(self, "blocks", blocks)
        if not self.name or "." in self.name:
            raise LayoutError(f"branch {self.name!r}: a branch name must be non-empty and contain no '.'")
        names = [b.name for b in blocks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LayoutError(f"branch {self.name!r}: duplicate block names {dup}")
        if self.output is None:
            if not blocks:
                raise LayoutError(f"branch {self.name!r}: no blocks and no output")
            object.__setattr__(self, "output", blocks[-1].name)


INIT_MODES = ("he", "xavier")


@dataclass(frozen=True)
class NetworkLayout:
    """Backbone, width multiplier and branches (the first is the main branch).

    ``init``: how the network's convolutions start (``he`` or ``xavier``, wsolevaluation's
    ``initialize_weights`` modes; pretrained backbone weights replace it).
    ``large_feature_map``: the backbone's last stage at stride 8, not 16 (28x28 maps at 224;
    wsolevaluation's option): for layouts whose branches all read that stage (the CAM ones).
    Validated on construction: every input resolves, shapes agree, every branch output
    has the classifier's channel count.
    """

    backbone: str
    branches: tuple[BranchLayout, ...]
    width: float = 1.0
    init: str = "he"
    large_feature_map: bool = False
    _shapes: dict[str, TapInfo] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        branches = tuple(b if isinstance(b, BranchLayout) else BranchLayout(**b) for b in self.branches)
        object.__setattr__(self, "branches", branches)
        if not branches:
            raise LayoutError("a layout needs at least one branch")
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise LayoutError(f"duplicate branch names {names}")
        if not self.width > 0:
            raise LayoutError(f"width must be > 0, got {self.width}")
        if self.init not in INIT_MODES:
            raise LayoutError(f"init {self.init!r}: choose one of {INIT_MODES}")
        try:
            taps = backbone_taps(self.backbone, self.width, self.large_feature_map)
        except ValueError as err:
            raise LayoutError(str(err)) from None
        self._shapes.update(taps)
        for branch in branches:
            self._check_branch(branch, taps)
        channels = [self.branch_output(b.name).channels for b in branches]
        if len(set(channels)) != 1:
            raise LayoutError(
                "every branch feeds the shared classifier, so all outputs need the same channels; got "
                + ", ".join(f"{b.name}={c}" for b, c in zip(branches, channels))
            )

    def _check_branch(self, branch: BranchLayout, taps: Mapping[str, TapInfo]) -> None:
        local: dict[str, TapInfo] = {}

        def resolve(ref: str, where: str) -> TapInfo:
            if ref in local:
                return local[ref]
            if ref in taps:
                return taps[ref]
            if "." in ref and ref in self._shapes:
                return self._shapes[ref]
            raise LayoutError(
                f"branch {branch.name!r}, {where}: unknown input {ref!r}; inputs are backbone taps "
                f"{list(taps)}, earlier blocks of this branch {list(local)} or earlier branches' "
                "blocks as 'branch.block'"
            )

        for block in branch.blocks:
            where = f"block {block.name!r}"
            if block.name in taps:
                raise LayoutError(f"branch {branch.name!r}, {where}: name clashes with a backbone tap")
            ins = [resolve(r, where) for r in block.inputs]
            strides = {i.stride for i in ins}
            if len(strides) != 1:
                raise LayoutError(
                    f"branch {branch.name!r}, {where}: inputs at different strides "
                    f"{dict(zip(block.inputs, (i.stride for i in ins)))}"
                )
            stride = ins[0].stride * block.stride
            if block.kind == "concat":
                channels = sum(i.channels for i in ins)
            else:
                channels = scale_channels(block.out_channels, self.width)
            local[block.name] = TapInfo(channels, stride)
            self._shapes[f"{branch.name}.{block.name}"] = local[block.name]
        out = resolve(branch.output, "output")
        self._shapes[f"{branch.name}.{branch.output}"] = out

    def input_shape(self, branch: str, ref: str) -> TapInfo:
        """Channels and stride of an input reference as seen from ``branch``."""
        return self._shapes.get(f"{branch}.{ref}") or self._shapes[ref]

    def branch_output(self, branch: str) -> TapInfo:
        b = next(b for b in self.branches if b.name == branch)
        return self.input_shape(branch, b.output)

    @property
    def feature_channels(self) -> int:
        """Channels entering the shared classifier."""
        return self.branch_output(self.branches[0].name).channels

    def required_taps(self) -> tuple[str, ...]:
        """Backbone taps any branch reads, in backbone order."""
        taps = backbone_taps(self.backbone, self.width, self.large_feature_map)
        used = {r for b in self.branches for blk in b.blocks for r in blk.inputs} | {
            b.output for b in self.branches
        }
        return tuple(t for t in taps if t in used)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, list, dict, None): safe for JSON, YAML, weights_only."""
        data = {
            "backbone": self.backbone,
            "width": float(self.width),
            "branches": [
                {
                    "name": b.name,
                    "output": b.output,
                    "blocks": [_block_dict(blk) for blk in b.blocks],
                }
                for b in self.branches
            ],
        }
        if self.init != "he":  # layouts with the defaults read as before
            data["init"] = self.init
        if self.large_feature_map:
            data["large_feature_map"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NetworkLayout":
        check_layout_keys(data, {"backbone", "branches", "width", "init", "large_feature_map"})
        try:
            branches = tuple(
                BranchLayout(
                    name=b["name"],
                    output=b.get("output"),
                    blocks=tuple(BlockSpec(**{**blk, "inputs": tuple(blk["inputs"])}) for blk in b.get("blocks", ())),
                )
                for b in data["branches"]
            )
            return cls(backbone=data["backbone"], branches=branches, width=float(data.get("width", 1.0)),
                       init=data.get("init", "he"), large_feature_map=data.get("large_feature_map", False))
        except (KeyError, TypeError) as err:
            raise LayoutError(f"malformed layout: {err!r}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "NetworkLayout":
        import yaml

        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(yaml.safe_load(fh))


def _block_dict(block: BlockSpec) -> dict[str, Any]:
    """A block as plain data; zero dropouts are left out (layouts without dropout read as before)."""
    data = dict(asdict(block), inputs=list(block.inputs))
    return {k: v for k, v in data.items() if not (k in ("input_dropout", "dropout") and v == 0)}


# --- the shipped layouts ----------------------------------------------------------------

def _head_branch() -> BranchLayout:
    return BranchLayout("main", (BlockSpec("head", "conv3x3_relu", ("conv5_3",), out_channels=1024),))


def _released_parallel_blocks() -> tuple[BlockSpec, ...]:
    return (
        BlockSpec("a", "bottleneck", ("conv4_2",), out_channels=896, width=224, stride=2),
        BlockSpec("b", "reduce1x1", ("conv5_1",), out_channels=64),
        BlockSpec("ab", "concat", ("a", "b")),
        BlockSpec("c", "bottleneck", ("ab",), out_channels=960, width=240),
        BlockSpec("d", "reduce1x1", ("conv5_3",), out_channels=64),
        BlockSpec("out", "concat", ("c", "d")),
    )


def released_vgg16_layout(width: float = 1.0) -> NetworkLayout:
    """The authors' released two-branch VGG16 layout (spec section 2): 22.74 M params at K=1000."""
    return NetworkLayout("vgg16", (_head_branch(), BranchLayout("parallel", _released_parallel_blocks())), width)


def three_branch_vgg16_layout(width: float = 1.0) -> NetworkLayout:
    """Three branches as the paper's figure draws them (our reading of the figure).

    The second branch is the released one (fed by main-branch, i.e. backbone, features);
    the third is fed by the second's: a bottleneck on its fused ``ab`` (960 ch) concatenated
    with a 1x1 reduction of its output (1024 -> 64).
    """
    third = BranchLayout(
        "third",
        (
            BlockSpec("e", "bottleneck", ("parallel.ab",), out_channels=960, width=240),
            BlockSpec("f", "reduce1x1", ("parallel.out",), out_channels=64),
            BlockSpec("out", "concat", ("e", "f")),
        ),
    )
    return NetworkLayout(
        "vgg16", (_head_branch(), BranchLayout("parallel", _released_parallel_blocks()), third), width
    )


def resnet50_layout(width: float = 1.0) -> NetworkLayout:
    """ResNet50: main branch is ``layer4`` (2048 ch, stride 16, no head conv, as wsolevaluation's
    ResNet CAM); the parallel branch fuses ``layer2`` and ``layer3`` to layer4's resolution in the
    same pattern as the VGG16 one, ending in 2048 channels for the shared ``Linear(2048, K)``.
    """
    parallel = BranchLayout(
        "parallel",
        (
            BlockSpec("a", "bottleneck", ("layer2",), out_channels=896, width=224, stride=2),
            BlockSpec("b", "reduce1x1", ("layer3",), out_channels=128),
            BlockSpec("ab", "concat", ("a", "b")),
            BlockSpec("c", "bottleneck", ("ab",), out_channels=1792, width=448),
            BlockSpec("d", "reduce1x1", ("layer4",), out_channels=256),
            BlockSpec("out", "concat", ("c", "d")),
        ),
    )
    return NetworkLayout("resnet50", (BranchLayout("main", (), output="layer4"), parallel), width)


def vgg16_cam_layout(width: float = 1.0) -> NetworkLayout:
    """The main branch alone (VGG16 + 3x3 conv to 1024 + GAP + FC): the one-branch baseline of the
    ablation, a plain CAM network."""
    return NetworkLayout("vgg16", (_head_branch(),), width)


def resnet50_cam_layout(width: float = 1.0) -> NetworkLayout:
    """ResNet50 CAM (wsolevaluation's ``ResNetCam``): ``layer4`` (2048 ch, stride 16) + GAP + FC,
    the main branch of ``resnet50_layout`` alone; Xavier initialization, as wsolevaluation's."""
    return NetworkLayout("resnet50", (BranchLayout("main", (), output="layer4"),), width, init="xavier")


def _inception_head_branch(dropout: float = 0.5) -> BranchLayout:
    """wsolevaluation's ``InceptionCam`` head on ``Mixed_6e``: ``SPG_A3_1b`` (3x3 conv 768 -> 1024
    + ReLU), ``SPG_A3_2b`` (3x3 conv 1024 -> 1024 + ReLU), stride 16; dropout ``p`` in training
    on ``Mixed_6e``, after ``SPG_A3_1b`` and after ``SPG_A3_2b`` (its ADL variant has none)."""
    return BranchLayout(
        "main",
        (
            BlockSpec("SPG_A3_1b", "conv3x3_relu", ("Mixed_6e",), out_channels=1024,
                      input_dropout=dropout, dropout=dropout),
            BlockSpec("SPG_A3_2b", "conv3x3_relu", ("SPG_A3_1b",), out_channels=1024, dropout=dropout),
        ),
    )


def inception_v3_cam_layout(width: float = 1.0) -> NetworkLayout:
    """InceptionV3 CAM as wsolevaluation's ``InceptionCam`` (spec section 1.2): 25,687,976
    parameters at K=200, 26,507,976 at K=1000.

    Its ``SPG_A4`` (1x1 conv 1024 -> K, bias) followed by GAP is the shared ``Linear(1024, K)``
    after GAP (the two commute), so the logits are the same function. Its CAM, channel ``y`` of
    ``SPG_A4``'s map, is ``w_y . F + b_y``; ours (``compute_maps(..., "cam")``) is
    ``mean_c(w_y * F) = (w_y . F) / C``: a positive scale and an offset, equal after min-max
    normalization. ``InceptionCam``'s three dropouts (p=0.5, training only) are the blocks'
    ``input_dropout`` / ``dropout``; ``inception_v3-cam-no-dropout`` is the head without them
    (wsolevaluation's ``InceptionAdl``). Xavier initialization, as wsolevaluation's.
    """
    return NetworkLayout("inception_v3", (_inception_head_branch(),), width, init="xavier")


def inception_v3_cam_no_dropout_layout(width: float = 1.0) -> NetworkLayout:
    """``inception_v3_cam_layout`` without its dropouts: the network of wsolevaluation's
    ``InceptionAdl`` (ADL replaces them)."""
    return NetworkLayout("inception_v3", (_inception_head_branch(dropout=0.0),), width, init="xavier")


def inception_v3_layout(width: float = 1.0) -> NetworkLayout:
    """InceptionV3, two branches: main = ``inception_v3_cam_layout``'s head on ``Mixed_6e``; the
    parallel branch is the released VGG16 one transposed (our design, not the authors'):

    * ``a``: bottleneck with stride 2 on ``Mixed_5d`` (288 ch, stride 8; the last stride-8 block,
      the tap of SPG's B1 branch), 288 -> 896 (inner 224), down to stride 16, as the VGG16
      branch's ``a`` on ``conv4_2`` and ResNet50's on ``layer2``;
    * ``b``: 1x1 reduction of ``Mixed_6b`` (the first factorized-7x7 block at stride 16, as
      ``conv5_1`` is the first conv at stride 16) to 64; ``ab`` = concat, 960 ch;
    * ``c``: bottleneck 960 -> 960 (inner 240); ``d``: 1x1 reduction of ``Mixed_6e`` (the last
      backbone tap, as ``conv5_3``) to 64; ``out`` = concat, 1024 ch: the main branch's width,
      for the shared ``Linear(1024, K)``.

    The same channel counts as the released VGG16 branch, on Inception's taps. The main branch
    keeps ``inception_v3_cam_layout``'s dropouts; the parallel branch has none.
    """
    parallel = BranchLayout(
        "parallel",
        (
            BlockSpec("a", "bottleneck", ("Mixed_5d",), out_channels=896, width=224, stride=2),
            BlockSpec("b", "reduce1x1", ("Mixed_6b",), out_channels=64),
            BlockSpec("ab", "concat", ("a", "b")),
            BlockSpec("c", "bottleneck", ("ab",), out_channels=960, width=240),
            BlockSpec("d", "reduce1x1", ("Mixed_6e",), out_channels=64),
            BlockSpec("out", "concat", ("c", "d")),
        ),
    )
    return NetworkLayout("inception_v3", (_inception_head_branch(), parallel), width)


#: Shipped layouts by name: ``<backbone>-<kind>``, the backbone as ``BACKBONE_NAMES`` spells it.
LAYOUTS = {
    "vgg16-cam": vgg16_cam_layout,
    "vgg16-mnpo": released_vgg16_layout,
    "vgg16-mnpo-3branch": three_branch_vgg16_layout,
    "resnet50-cam": resnet50_cam_layout,
    "resnet50-mnpo": resnet50_layout,
    "inception_v3-cam": inception_v3_cam_layout,
    "inception_v3-cam-no-dropout": inception_v3_cam_no_dropout_layout,
    "inception_v3-mnpo": inception_v3_layout,
}


# --- the network ---------------------------------------------------------------------------

def _concat(*features: Tensor) -> Tensor:
    return concat(features)


def _same_rows(features: list[Tensor]) -> list[Tensor]:
    """Inputs of one block with ``B`` and ``k B`` rows (after ``replace``): each ``B``-row
    input repeated ``k`` times per image, as the replaced feature's copies are laid out."""
    rows = max(f.shape[0] for f in features)
    return [f if f.shape[0] == rows else f.repeat_interleave(rows // f.shape[0], dim=0) for f in features]


@dataclass
class MultiBranchOutput:
    """``logits``: one ``(B, K)`` per branch, main first. ``features`` (when asked): ``head``
    (the main branch's pre-GAP map), each branch's pre-GAP map by branch name, every block's
    output as ``"branch.block"`` and the backbone taps asked for; all ``(B, C, h, w)``."""

    logits: tuple[Tensor, ...]
    features: dict[str, Tensor] | None = None


class MultiBranchNet(nn.Module):
    """Backbone + branches + one shared classifier. ``(B, 3, H, W) -> MultiBranchOutput``."""

    def __init__(self, layout: NetworkLayout, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.layout = layout
        self.num_classes = num_classes
        self.backbone = build_backbone(layout.backbone, layout.width, large_feature_map=layout.large_feature_map)
        self._taps = layout.required_taps()
        self.branches = nn.ModuleDict()
        for branch in layout.branches:
            blocks = nn.ModuleDict()
            for spec in branch.blocks:
                if spec.kind == "concat":
                    continue
                in_ch = layout.input_shape(branch.name, spec.inputs[0]).channels
                out_ch = scale_channels(spec.out_channels, layout.width)
                if spec.kind == "bottleneck":
                    blocks[spec.name] = Bottleneck(in_ch, scale_channels(spec.width, layout.width), out_ch, spec.stride)
                elif spec.kind == "reduce1x1":
                    blocks[spec.name] = Reduce1x1(in_ch, out_ch)
                else:
                    blocks[spec.name] = Conv3x3ReLU(in_ch, out_ch)
            self.branches[branch.name] = blocks
        self.classifier = nn.Linear(layout.feature_channels, num_classes)
        self.input_multiple = max(layout.input_shape(b.name, b.output).stride for b in layout.branches)
        init_he(self, layout.init)

    def classifier_for(self, branch: str) -> nn.Linear:
        """The classifier of ``branch``: the one shared by every branch."""
        if all(b.name != branch for b in self.layout.branches):
            raise KeyError(f"unknown branch {branch!r}; this network has {[b.name for b in self.layout.branches]}")
        return self.classifier

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every name ``forward`` can return as a feature (or truncate the graph at)."""
        blocks = [f"{b.name}.{blk.name}" for b in self.layout.branches for blk in b.blocks]
        return ("head", *(b.name for b in self.layout.branches), *blocks, *self.backbone.taps)

    def resolve_feature(self, name: str) -> str:
        """The tensor behind a feature name: a backbone tap or ``"branch.block"``."""
        if name == "head":
            name = self.layout.branches[0].name
        branch = next((b for b in self.layout.branches if b.name == name), None)
        if branch is not None:
            local = f"{branch.name}.{branch.output}"
            return local if any(blk.name == branch.output for blk in branch.blocks) else branch.output
        if name in self.backbone.taps or name in self.feature_names:
            return name
        raise KeyError(f"unknown feature {name!r}; this network has {list(self.feature_names)}")

    def forward(self, x: Tensor, return_features: bool = False, taps: Sequence[str] = (),
                grad_from: str | None = None, replace: tuple[str, Tensor] | None = None) -> MultiBranchOutput:
        """Per-branch logits and, with ``return_features``, the named features.

        ``taps``: extra backbone taps to return. ``grad_from``: a feature name (tap, block,
        branch or ``head``); it is returned as a leaf requiring grad, what comes before it runs
        under inference mode and only what depends on it records autograd, so ``torch.autograd.grad(logits, features
        [grad_from])`` is a backward pass truncated there.
        ``replace``: ``(feature name, value)`` with value ``(k B, C, h, w)``, each image's ``k``
        copies adjacent: the layers after the feature continue from ``value`` instead of what
        they computed, those before it run once on ``x``. Features and logits fed by it have
        ``k B`` rows, and inputs they share with the rest are repeated to match (ablation).
        """
        if replace is not None:
            replace = (self.resolve_feature(replace[0]), replace[1])
            if replace[1].shape[0] % x.shape[0]:
                raise ValueError(f"replace: {replace[1].shape[0]} rows are not a multiple of the batch {x.shape[0]}")
        if x.shape[-2] % self.input_multiple or x.shape[-1] % self.input_multiple:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels: this layout needs sides divisible by "
                             f"{self.input_multiple} (its branches meet at stride {self.input_multiple})")
        target = None if grad_from is None else self.resolve_feature(grad_from)
        run = (lambda m, *t: m(*t)) if target is None else run_tracked
        backbone_target = target if target in self.backbone.taps else None
        backbone_replace = replace if replace is not None and replace[0] in self.backbone.taps else None
        wanted = (*self._taps, *taps)
        if target is not None and backbone_target is None:
            with torch.inference_mode():
                values: dict[str, Tensor] = dict(self.backbone(x, wanted))
        else:
            values = dict(self.backbone(x, wanted, grad_from=backbone_target, replace=backbone_replace))
        maps: dict[str, Tensor] = {}
        for branch in self.layout.branches:
            modules = self.branches[branch.name]

            def get(ref: str, _b: str = branch.name) -> Tensor:
                local = f"{_b}.{ref}"
                return values[local] if local in values else values[ref]

            for spec in branch.blocks:
                key = f"{branch.name}.{spec.name}"
                if replace is not None and key == replace[0]:
                    values[key] = replace[1]
                    continue
                inputs = _same_rows([get(r) for r in spec.inputs])
                if spec.input_dropout and self.training:
                    inputs = [F.dropout(t, spec.input_dropout, training=True) for t in inputs]
                y = run(_concat, *inputs) if spec.kind == "concat" else run(modules[spec.name], inputs[0])
                if spec.dropout and self.training:
                    y = F.dropout(y, spec.dropout, training=True)
                values[key] = gradient_leaf(y) if key == target else y
            maps[branch.name] = get(branch.output)
        logits = tuple(run(self.classifier, m.mean(dim=(2, 3))) for m in maps.values())
        if not return_features:
            return MultiBranchOutput(logits)
        features = {"head": maps[self.layout.branches[0].name], **maps}
        features.update({k: v for k, v in values.items() if "." in k})
        features.update({t: values[t] for t in taps})
        if grad_from is not None:
            features[grad_from] = values[target]
        return MultiBranchOutput(logits, features)
