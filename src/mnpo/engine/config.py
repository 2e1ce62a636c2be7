"""Training configuration: dataclasses read from YAML, validated when read.

A config file has four sections (every key optional except ``data.root`` and
``data.metadata``; the defaults are the released ILSVRC recipe)::

    data:    {root, metadata, mask_root, num_classes, val_per_class, workers,
              resize_size, crop_size, random_resized, jpeg_draft}
    model:   {layout, width, pretrained, imagenet_classifier, large_feature_map, drop_path}
    method:  {name, has_grid_size, has_drop_rate, cutmix_beta, cutmix_prob, adl_drop_rate, adl_threshold,
              acol_threshold, spg_thresholds, bas_weights, bas_beta, bas_lambda_fg,
              bgc_dataset, bgc_warmup_epochs, bgc_lambda_sim, bgc_fg_threshold, bgc_bg_threshold,
              bgc_lambda_norm, bgc_lambda_drop, bgc_drop_threshold, bgc_drop_prob, sat_area,
              fsl_holdout_per_class}
    optim:   {optimizer, epochs, batch_size, lr, new_layer_lr_ratio, bias_lr_ratio, momentum, weight_decay,
              nesterov, lr_schedule, lr_milestones, lr_gamma, min_lr, clip_grad_norm}
    eval:    {method, metric, cam_curve_interval, batch_size}
    runtime: {out, device, precision, channels_last, compile, seed, log_every}

``data.metadata`` is a folder holding the ``train``, ``val`` (and ``test``) split folders
in the wsolevaluation layout. Unknown keys, wrong types and impossible values are refused
with the file and the dotted key named. Overrides on the command line use the same dotted
keys: ``optim.lr=0.001 runtime.out=runs/x``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml


#: ``optim.optimizer`` values
OPTIMIZERS = ("sgd", "adamw")
#: ``optim.lr_schedule`` values
LR_SCHEDULES = ("step", "cosine")
#: training methods that train a network of their own (``<backbone>-<method>`` layouts)
OWN_NETWORK_METHODS = ("acol", "spg", "bas", "bgc", "tscam", "sat")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass
class DataConfig:
    """``random_resized``: train on ``RandomResizedCrop`` views instead of wsolevaluation's
    ``Resize((256, 256))`` + ``RandomCrop``; ``jpeg_draft``: decode a training JPEG only at the
    resolution its view needs (:class:`~mnpo.data.transforms.TrainAugmentation`; off: every
    pixel decoded, the views torchvision's pipeline gives)."""

    root: str = ""
    metadata: str = ""
    mask_root: str | None = None
    num_classes: int | None = None
    val_per_class: int | None = None
    workers: int = 4
    resize_size: int = 256
    crop_size: int = 224
    random_resized: bool = False
    jpeg_draft: bool = False


@dataclass
class ModelConfig:
    """``layout``: a shipped layout name or a ``.yaml`` layout file; ``pretrained``: ``imagenet``,
    a torchvision ``.pth`` or null; ``imagenet_classifier``: start the classifier from that file's
    ImageNet ``fc`` too (wsolevaluation's ILSVRC ResNet50 CAM, HaS, CutMix and ADL);
    ``large_feature_map``: the backbone's last stage at stride 8, 28x28 maps at 224
    (wsolevaluation's option; the CAM, ACoL and SPG layouts); ``drop_path``: a DeiT's stochastic
    depth, 0 at the first block to this at the last (the transformer layouts; 0: off)."""

    layout: str = "vgg16-mnpo"
    width: float = 1.0
    pretrained: str | None = "imagenet"
    imagenet_classifier: bool = False
    large_feature_map: bool = False
    drop_path: float = 0.0


@dataclass
class MethodConfig:
    """The WSOL training method (:mod:`mnpo.engine.training_methods`): ``plain`` (CAM, MNPO),
    ``has``, ``cutmix``, ``adl``, ``acol``, ``spg`` (defaults: wsolevaluation's ``config.py``
    values; ``acol`` and ``spg`` need the ``<backbone>-acol`` / ``<backbone>-spg`` layout) or
    ``fsl`` (the few-shot fully supervised baseline; ``fsl_holdout_per_class``: val images per
    class held out, ours). ``spg_thresholds``: ``[1h, 1l, 2h, 2l, 3h, 3l]``. ``bas`` (the
    ``<backbone>-bas`` layout): ``bas_beta`` and ``bas_lambda_fg``, null: the authors' values for
    the data set ``bas_weights`` (``cub`` or ``ilsvrc``) and the backbone. ``bgc`` (the
    ``<backbone>-bgc`` layout): the ``bgc_*`` settings, null: the authors' CUB values for the
    backbone; ``bgc_dataset`` picks the norm loss's branch (``cub``: the class maximum of the
    similarity, ``ilsvrc``: the label's); ``bgc_warmup_batch_size``: the batch during the warm-up
    epochs (the authors' ``warm_batch_size``; null: ``optim.batch_size``). ``tscam`` and ``sat``
    (the ``deit_*-tscam`` / ``deit_*-sat`` layouts); ``sat_area``: SAT's area target (the authors'
    0.25 on CUB, 0.35 on ImageNet). ``scm`` trains a ``deit_*-tscam`` network through SCM's
    calibration layers (training only: the checkpoint is TS-CAM's network)."""

    name: str = "plain"
    has_grid_size: int = 4
    has_drop_rate: float = 0.5
    cutmix_beta: float = 1.0
    cutmix_prob: float = 1.0
    adl_drop_rate: float = 0.75
    adl_threshold: float = 0.9
    acol_threshold: float = 0.7
    spg_thresholds: list[float] = field(default_factory=lambda: [0.7, 0.01, 0.5, 0.05, 0.7, 0.1])
    bas_weights: str = "cub"
    bas_beta: float | None = None
    bas_lambda_fg: float | None = None
    bgc_dataset: str = "cub"
    bgc_warmup_epochs: int = 20
    bgc_warmup_batch_size: int | None = None
    bgc_lambda_sim: float | None = None
    bgc_fg_threshold: float | None = None
    bgc_bg_threshold: float | None = None
    bgc_lambda_norm: float | None = None
    bgc_lambda_drop: float | None = None
    bgc_drop_threshold: float | None = None
    bgc_drop_prob: float | None = None
    sat_area: float = 0.25
    fsl_holdout_per_class: int = 1

    def bgc_weights_for(self, backbone: str):
        """BGC's loss settings (``BgcWeights``) on ``backbone``: the ones given, else the authors'."""
        from mnpo.engine.training_methods import BGC_WEIGHTS, BgcWeights

        names = ("lambda_sim", "fg_threshold", "bg_threshold", "lambda_norm", "lambda_drop")
        given = [getattr(self, f"bgc_{n}") for n in names]
        return BgcWeights(*(d if g is None else g for g, d in zip(given, BGC_WEIGHTS[backbone])))

    def bgc_drop_for(self, backbone: str) -> tuple[float, float]:
        """AttentiveDrop's ``(threshold, probability)`` on ``backbone``: given, else the authors'."""
        from mnpo.models.bgc import BGC_DROP

        threshold, prob = BGC_DROP[backbone]
        return (threshold if self.bgc_drop_threshold is None else self.bgc_drop_threshold,
                prob if self.bgc_drop_prob is None else self.bgc_drop_prob)

    def bas_weights_for(self, backbone: str) -> tuple[float, float]:
        """BAS's ``(beta, lambda_fg)`` on ``backbone``: the ones given, else the authors'."""
        from mnpo.engine.training_methods import BAS_WEIGHTS

        beta, lambda_fg = BAS_WEIGHTS[self.bas_weights][backbone]
        return (beta if self.bas_beta is None else self.bas_beta,
                lambda_fg if self.bas_lambda_fg is None else self.bas_lambda_fg)


@dataclass
class OptimConfig:
    """``optimizer``: ``sgd`` (``momentum``, ``nesterov``) or ``adamw`` (betas 0.9 / 0.999, eps 1e-8,
    timm's defaults; ``weight_decay`` spares biases, norms and a transformer's tokens and
    positional embeddings, as timm's ``create_optimizer``). ``lr_schedule``: ``step`` (x ``lr_gamma``
    from each of ``lr_milestones``, 0-based epochs) or ``cosine`` (epoch ``e`` of ``E`` at
    ``min + (rate - min) (1 + cos(pi e / E)) / 2``, ``min`` = ``min_lr`` scaled as the group's rate;
    per epoch, where SAT's ``cosine_scheduler`` steps per batch)."""

    optimizer: str = "sgd"
    epochs: int = 10
    batch_size: int = 100
    lr: float = 0.0008
    new_layer_lr_ratio: float = 15.0
    #: biases train at ``bias_lr_ratio`` times their group's rate (BAS: 2; 1: one group each)
    bias_lr_ratio: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    lr_schedule: str = "step"
    lr_milestones: list[int] = field(default_factory=lambda: [4, 8])
    lr_gamma: float = 0.1
    min_lr: float = 0.0
    clip_grad_norm: float | None = None  # off, as in the paper; a max L2 norm over all gradients


@dataclass
class EvalConfig:
    method: str = "mnpos"
    metric: str = "max_box_acc_v2"
    cam_curve_interval: float = 0.01
    batch_size: int = 64


@dataclass
class RuntimeConfig:
    """``log_every``: steps between reads of the device's loss / accuracy sums (the progress bar's
    numbers, and the check that stops a diverged run: at most that many steps late)."""

    out: str = "runs/mnpo"
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = 20


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRECISIONS = ("auto", "fp32", "tf32", "bf16")  # see mnpo.engine.runtime.resolve_precision
SELECTION_METRICS = ("max_box_acc", "max_box_acc_v2", "gt_known_loc", "top1_loc", "pxap", "top1_cls")


def _check_value(where: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the annotated type ``hint`` or a ConfigError naming ``where``."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; known keys here: {names}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data[name], key)
        else:
            kwargs[name] = _check_value(key, data[name], hints[name])
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    from mnpo.maps import METHODS
    from mnpo.models import LAYOUTS

    problems = []
    if not cfg.data.root:
        problems.append("data.root: required (the folder the image ids are relative to)")
    if not cfg.data.metadata:
        problems.append("data.metadata: required (the folder holding train/, val/ and test/)")
    positive = {"optim.epochs": cfg.optim.epochs, "optim.batch_size": cfg.optim.batch_size,
                "eval.batch_size": cfg.eval.batch_size, "data.crop_size": cfg.data.crop_size,
                "data.resize_size": cfg.data.resize_size, "runtime.log_every": cfg.runtime.log_every}
    problems += [f"{k}: must be >= 1, got {v}" for k, v in positive.items() if v < 1]
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if cfg.optim.optimizer not in OPTIMIZERS:
        problems.append(f"optim.optimizer: {cfg.optim.optimizer!r}; choose one of {OPTIMIZERS}")
    if cfg.optim.lr_schedule not in LR_SCHEDULES:
        problems.append(f"optim.lr_schedule: {cfg.optim.lr_schedule!r}; choose one of {LR_SCHEDULES}")
    if not 0 <= cfg.optim.min_lr <= cfg.optim.lr:
        problems.append(f"optim.min_lr: must be in [0, optim.lr = {cfg.optim.lr}], got {cfg.optim.min_lr}")
    if not 0 < cfg.method.sat_area < 1:
        problems.append(f"method.sat_area: must be in (0, 1), got {cfg.method.sat_area}")
    if cfg.data.workers < 0:
        problems.append(f"data.workers: must be >= 0, got {cfg.data.workers}")
    if cfg.data.num_classes is not None and cfg.data.num_classes < 1:
        problems.append(f"data.num_classes: must be >= 1, got {cfg.data.num_classes}")
    if cfg.model.imagenet_classifier and cfg.model.pretrained is None:
        problems.append("model.imagenet_classifier: needs model.pretrained (the weights its classifier comes from)")
    if cfg.model.width <= 0:
        problems.append(f"model.width: must be > 0, got {cfg.model.width}")
    if cfg.model.layout not in LAYOUTS and not cfg.model.layout.endswith((".yaml", ".yml")):
        problems.append(f"model.layout: {cfg.model.layout!r} is neither a shipped layout {sorted(LAYOUTS)} "
                        "nor a .yaml layout file")
    from mnpo.engine.training_methods import TRAINING_METHODS

    m = cfg.method
    if m.name not in TRAINING_METHODS:
        problems.append(f"method.name: {m.name!r}; choose one of {TRAINING_METHODS}")
    if m.has_grid_size < 0:
        problems.append(f"method.has_grid_size: must be >= 0 (0: off), got {m.has_grid_size}")
    for key, value in (("has_drop_rate", m.has_drop_rate), ("cutmix_prob", m.cutmix_prob),
                       ("adl_drop_rate", m.adl_drop_rate), ("adl_threshold", m.adl_threshold),
                       ("acol_threshold", m.acol_threshold)):
        if not 0 <= value <= 1:
            problems.append(f"method.{key}: must be in [0, 1], got {value}")
    if len(m.spg_thresholds) != 6 or any(not 0 <= t <= 1 for t in m.spg_thresholds):
        problems.append(f"method.spg_thresholds: expected 6 values in [0, 1] (1h, 1l, 2h, 2l, 3h, 3l), "
                        f"got {m.spg_thresholds}")
    from mnpo.engine.training_methods import BAS_DATASETS

    if m.bas_weights not in BAS_DATASETS:
        problems.append(f"method.bas_weights: {m.bas_weights!r}; choose one of {BAS_DATASETS}")
    for key, value in (("bas_beta", m.bas_beta), ("bas_lambda_fg", m.bas_lambda_fg)):
        if value is not None and not value >= 0:
            problems.append(f"method.{key}: must be >= 0 (or null: the authors' value), got {value}")
    from mnpo.engine.training_methods import BGC_DATASETS

    if m.bgc_dataset not in BGC_DATASETS:
        problems.append(f"method.bgc_dataset: {m.bgc_dataset!r}; choose one of {BGC_DATASETS}")
    if m.bgc_warmup_epochs < 0:
        problems.append(f"method.bgc_warmup_epochs: must be >= 0, got {m.bgc_warmup_epochs}")
    if m.bgc_warmup_batch_size is not None and not m.bgc_warmup_batch_size >= 1:
        problems.append(f"method.bgc_warmup_batch_size: must be >= 1 (or null: optim.batch_size), "
                        f"got {m.bgc_warmup_batch_size}")
    for key in ("bgc_lambda_sim", "bgc_lambda_norm", "bgc_lambda_drop"):
        value = getattr(m, key)
        if value is not None and not value >= 0:
            problems.append(f"method.{key}: must be >= 0 (or null: the authors' value), got {value}")
    for key in ("bgc_fg_threshold", "bgc_bg_threshold", "bgc_drop_threshold", "bgc_drop_prob"):
        value = getattr(m, key)
        if value is not None and not 0 <= value <= 1:
            problems.append(f"method.{key}: must be in [0, 1] (or null: the authors' value), got {value}")
    if not cfg.optim.bias_lr_ratio > 0:
        problems.append(f"optim.bias_lr_ratio: must be > 0, got {cfg.optim.bias_lr_ratio}")
    problems += _method_layout_problems(cfg)
    if cfg.model.large_feature_map and cfg.model.layout in LAYOUTS and cfg.model.width > 0:
        from mnpo.models import LayoutError

        try:
            dataclasses.replace(LAYOUTS[cfg.model.layout](cfg.model.width), large_feature_map=True)
        except LayoutError as err:
            problems.append(f"model.large_feature_map: the {cfg.model.layout} layout cannot have it ({err})")
    if cfg.model.drop_path and cfg.model.layout in LAYOUTS and cfg.model.width > 0:
        from mnpo.models import LayoutError

        try:
            dataclasses.replace(LAYOUTS[cfg.model.layout](cfg.model.width), drop_path=cfg.model.drop_path)
        except (LayoutError, TypeError) as err:  # TypeError: a NetworkLayout has no drop_path
            reason = err if isinstance(err, LayoutError) else "a CNN layout has no residual blocks to drop"
            problems.append(f"model.drop_path: the {cfg.model.layout} layout cannot have {cfg.model.drop_path} "
                            f"({reason})")
    elif cfg.model.drop_path and not 0 <= cfg.model.drop_path < 1:
        problems.append(f"model.drop_path: must be in [0, 1), got {cfg.model.drop_path}")
    if m.fsl_holdout_per_class < 1:
        problems.append(f"method.fsl_holdout_per_class: must be >= 1, got {m.fsl_holdout_per_class}")
    if m.name == "fsl" and cfg.eval.metric == "top1_cls":
        problems.append("eval.metric: 'top1_cls' means nothing for fsl (a foreground model has no classes)")
    if m.cutmix_beta < 0:
        problems.append(f"method.cutmix_beta: must be >= 0 (0: off), got {m.cutmix_beta}")
    if cfg.eval.method not in METHODS:
        problems.append(f"eval.method: {cfg.eval.method!r}; choose one of {METHODS}")
    if cfg.eval.metric not in SELECTION_METRICS:
        problems.append(f"eval.metric: {cfg.eval.metric!r}; choose one of {SELECTION_METRICS}")
    if cfg.runtime.precision not in PRECISIONS:
        problems.append(f"runtime.precision: {cfg.runtime.precision!r}; choose one of {PRECISIONS}")
    if cfg.optim.clip_grad_norm is not None and not cfg.optim.clip_grad_norm > 0:
        problems.append(f"optim.clip_grad_norm: must be > 0 (or null: off), got {cfg.optim.clip_grad_norm}")
    if sorted(cfg.optim.lr_milestones) != cfg.optim.lr_milestones or any(m < 1 for m in cfg.optim.lr_milestones):
        problems.append(f"optim.lr_milestones: must be increasing epochs >= 1, got {cfg.optim.lr_milestones}")
    if not 0 < cfg.eval.cam_curve_interval < 1:
        problems.append(f"eval.cam_curve_interval: must be in (0, 1), got {cfg.eval.cam_curve_interval}")
    if problems:
        raise ConfigError("; ".join(problems))


def _method_layout_problems(cfg: TrainConfig) -> list[str]:
    """ACoL, SPG and BAS train their own networks: ``method.name`` and the layout must agree."""
    from mnpo.models import LAYOUTS, network_kind

    name, layout = cfg.method.name, cfg.model.layout
    kind = network_kind(LAYOUTS[layout]()) if layout in LAYOUTS else "multibranch"
    if name == "scm":  # SCM trains a TS-CAM network through its calibration layers
        if kind != "tscam":
            return [f"model.layout: {layout!r} is not a tscam network; method 'scm' trains 'deit_small-tscam' "
                    "(or another 'deit_*-tscam')"]
        return []
    if kind in OWN_NETWORK_METHODS and name != kind:
        return [f"method.name: {name!r}, but model.layout {layout!r} is the {kind} network; set method.name: {kind}"
                + (" (or scm)" if kind == "tscam" else "")]
    if name in OWN_NETWORK_METHODS and kind != name:
        backbone = layout.split("-")[0] if layout in LAYOUTS else ("deit_small" if name in ("tscam", "sat") else "vgg16")
        article = "a" if name in ("bas", "bgc", "tscam", "sat") else "an"
        return [f"model.layout: {layout!r} is not {article} {name} network; method {name!r} needs "
                f"'{backbone}-{name}' (or another '<backbone>-{name}')"]
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> ``(["optim", "lr"], 0.01)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.001")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "config") -> TrainConfig:
    """Build and validate a config from plain data plus ``KEY=VALUE`` overrides."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (data or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    try:
        cfg = _build(TrainConfig, merged, "")
        _validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config file; relative data paths stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(data or {}, overrides, str(path))
