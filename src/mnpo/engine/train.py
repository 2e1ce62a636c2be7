"""Training: SGD (Nesterov) on the sum of the branches' cross-entropies (or a WSOL training
method's loss: HaS, CutMix, ADL, ACoL, SPG, FSL, see :mod:`mnpo.engine.training_methods`), validation each
epoch, atomic best/last checkpoints, exact resume.

The run folder (``runtime.out``) holds ``config.yaml``, ``metrics.csv`` (one row per epoch),
``tensorboard/`` (when the ``tensorboard`` package is installed), ``last.pt`` (written after
every epoch, with the optimizer, scheduler and RNG states) and ``best.pt`` (the epoch with the
best ``eval.metric`` on val). ``resume=True`` continues from ``last.pt``: every epoch draws its
data order from ``(seed, epoch)`` and each image's augmentation from a generator seeded by
``(seed, epoch, index)`` (:mod:`mnpo.engine.train_input`), and the model's own randomness
(dropout) from torch's global generator, seeded once and saved with the run, so a resumed run
ends with the same weights as one never interrupted, with any number of loader workers (on the
CPU; GPU kernels may not be deterministic), and W data-parallel processes see exactly the
batches of one process.

The input pipeline is built for a GPU: one loader for the run with persistent workers, uint8
images from the workers (pinned on CUDA), normalized on the device; the loss, accuracy and
finiteness of the steps are summed on the device and read once every ``runtime.log_every``
steps and at the epoch's end, so a step does not wait for the host (a diverged loss stops the
run at the next read, naming the first step whose loss was not finite); ``cudnn.benchmark``
is on for the training epochs.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mnpo.data.dataset import WSOLDataset, subsample_per_class
from mnpo.data.foreground import ForegroundDataset
from mnpo.data.make_metadata import CLASS_NAMES, AnnotationError, read_class_names
from mnpo.data.metadata import read_split, write_split
from mnpo.data.transforms import train_transform
from mnpo.engine.config import ConfigError, TrainConfig
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.evaluate_maps import build_report
from mnpo.engine.runtime import (
    all_reduce_sum,
    autocast,
    cudnn_autotune,
    init_distributed,
    local_main_first,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mnpo.engine.train_input import EpochSampler, TrainingItems, device_images, training_loader
from mnpo.engine.training_methods import (
    HideAndSeek,
    attach_adl,
    bas_loss,
    bgc_loss,
    check_foreground_targets,
    cutmix_batch,
    foreground_logits,
    foreground_loss,
    mixed_loss,
    sat_loss,
    spg_loss,
)
from mnpo.io import atomic_path
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import LAYOUTS, NetworkLayout, build_model, network_kind
from mnpo.models.checkpoint import load_plain, model_from_payload, save_checkpoint
from mnpo.models.scm import ScmTraining, SpatialCalibration

log = logging.getLogger(__name__)


#: VGG16's ``features`` index of conv4_1: SPG's 10x group starts there (spec 3).
VGG16_CONV4_1 = 17


def in_new_layer_group(name: str, layout) -> bool:
    """Whether parameter ``name`` trains at ``lr * new_layer_lr_ratio``, as wsolevaluation groups
    them (spec 3): every parameter outside the backbone, except ResNet50's ACoL and SPG heads;
    plus ResNet50's ``layer4`` (every ResNet50 network but BAS's) and VGG16's conv4 and conv5 in
    SPG's. BAS's are its own layers alone (the authors' ``get_optimizer``)."""
    kind = network_kind(layout)
    outside = not name.startswith("backbone.")
    if kind == "bas":  # the authors' ``classifier*`` layers: the head and the generator (not Mixed_7*)
        return name.startswith(("cls_head.", "generator."))
    if kind == "bgc":  # the authors': ResNet50's fc alone, VGG16's all but ``features`` (InceptionV3 as VGG16: ours)
        return name.startswith("classifier_main.") if layout.backbone == "resnet50" else outside
    if layout.backbone == "resnet50":
        layer4 = name.startswith("backbone.layer4.")
        return layer4 if kind in ("acol", "spg") else layer4 or outside
    if layout.backbone == "vgg16" and kind == "spg" and not outside:
        return int(name.split(".")[2]) >= VGG16_CONV4_1
    return outside


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the (pretrained) layers at ``lr``, the new layers at
    ``lr * new_layer_lr_ratio``, as wsolevaluation groups them (:func:`in_new_layer_group`);
    with ``bias_lr_ratio`` other than 1, four: those two groups' weights, then their biases at
    ``bias_lr_ratio`` times the rate (BAS: ``lr``, ``10 lr``, ``2 lr``, ``20 lr``).

    ``optim.optimizer: adamw``: each group split once more, the parameters AdamW decays and those
    it does not (:func:`decays`), as timm's ``create_optimizer`` (TS-CAM's, SAT's); empty groups
    are left out.

    (The release's ``main.py`` sorts parameters by name patterns, ``features.`` and
    ``branch1_layer``, that its ``vgg_MNPO``/``vgg_MNPOs`` architectures do not match as
    written, so its training grouping cannot be read off the code; only inference was released.)
    """
    o = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split_bias = o.bias_lr_ratio != 1
    groups = []
    for bias in (False, True) if split_bias else (None,):
        for new in (False, True):
            params = [p for n, p in named if in_new_layer_group(n, model.layout) == new
                      and (bias is None or n.endswith(".bias") == bias)]
            groups.append({"params": params, "lr": group_lr(o, new, bias), "new_layer": new, "bias": bias})
    if o.optimizer == "adamw":
        spared = {f"backbone.{n}" for n in getattr(getattr(model, "backbone", None), "no_weight_decay", set)()}
        names = {id(p): n for n, p in named}
        split = []
        for group in groups:
            for decay in (True, False):
                params = [p for p in group["params"] if decays(names[id(p)], p, spared) == decay]
                if params:
                    split.append({**group, "params": params, "weight_decay": o.weight_decay if decay else 0.0})
        return torch.optim.AdamW(split, lr=o.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def group_lr(optim: Any, new_layer: bool, bias: bool | None) -> float:
    """A parameter group's base rate under ``optim`` (an ``OptimConfig`` or a saved one's dict):
    ``lr``, times ``new_layer_lr_ratio`` for the new layers, times ``bias_lr_ratio`` for biases
    kept apart."""
    get = optim.get if isinstance(optim, dict) else lambda key, default=None: getattr(optim, key)
    lr = get("lr", 0.0)
    lr *= get("new_layer_lr_ratio", 1.0) if new_layer else 1.0
    return lr * (get("bias_lr_ratio", 1.0) if bias else 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """``optim.lr_schedule``: ``step`` (MultiStepLR on ``lr_milestones`` and ``lr_gamma``) or
    ``cosine`` (epoch ``e`` of ``E`` at ``m + (1 - m) (1 + cos(pi e / E)) / 2`` times its group's
    rate, ``m = min_lr / lr``); stepped once per epoch."""
    o = cfg.optim
    if o.lr_schedule == "cosine":
        floor = o.min_lr / o.lr

        def factor(epoch: int) -> float:
            return floor + (1 - floor) * (1 + math.cos(math.pi * epoch / o.epochs)) / 2

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, o.lr_milestones, o.lr_gamma)


def decays(name: str, parameter: torch.Tensor, spared: set[str] = frozenset()) -> bool:
    """Whether AdamW decays a parameter: not a bias, nor any 1-D tensor (norms), nor one of
    ``spared`` (a transformer's tokens and positional embeddings), as timm's
    ``param_groups_weight_decay``."""
    return parameter.ndim > 1 and not name.endswith(".bias") and name not in spared


def wsol_loss(logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """``sum_i CE(logits_i, y)`` over the branches (spec section 2)."""
    return sum(F.cross_entropy(l.float(), labels) for l in logits)


class StepSums:
    """The epoch's loss x images, hits and first non-finite loss, summed on the device: adding a
    step costs no host sync; :meth:`read` syncs once (every ``log_every`` steps)."""

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.sums = torch.zeros(2, dtype=dtype, device=device)  # loss * images, hits
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        self.bad_loss = torch.zeros((), dtype=dtype, device=device)
        self.images = 0  # known on the host from the batches

    def add(self, step: int, loss: torch.Tensor, hits: torch.Tensor, images: int) -> None:
        loss = loss.detach().to(self.sums.dtype)
        self.sums += torch.stack([loss * images, hits.detach().to(self.sums.dtype)])
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step.masked_fill_(first, step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.images += images

    def read(self) -> tuple[float, float, int, float]:
        """``(loss x images, hits, first non-finite step or -1, its loss)``: one transfer."""
        values = torch.cat([self.sums, self.bad_loss[None], self.bad_step[None].to(self.sums.dtype)]).tolist()
        return values[0], values[1], int(values[3]), values[2]


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    skipped: int
    seconds: float


class ForegroundLogits(torch.nn.Module):
    """fsl's training forward: images ``(B, 3, H, W)`` -> per-pixel foreground logits
    ``(B, H, W)`` from the main branch's head and the classifier (:func:`foreground_logits`).
    Its output alone enters the loss, so that DDP sees which parameters the loss reaches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images, return_features=True).features["head"]
        return foreground_logits(features, self.model.classifier.weight, self.model.classifier.bias,
                                 tuple(images.shape[-2:]))


class Trainer:
    """Train one config. ``fit()`` runs the remaining epochs; ``on_epoch_end`` (tests, tools)
    is called with the epoch number after its checkpoint is written."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
                 on_epoch_end: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(cfg.runtime.device)
        self.precision = resolve_precision(cfg.runtime.precision, self.device)
        self.ctx = init_distributed(self.device)
        self.out = Path(cfg.runtime.out)
        self._check_data()
        self.class_names = self._class_names()
        self.train_set, self.val_set = self._datasets()
        m = cfg.method
        # HaS: cells drawn with each image in the loader, hidden on the device after normalization
        self.hide = HideAndSeek(m.has_grid_size, m.has_drop_rate) if m.name == "has" else None
        self.loader = None  # the run's one training loader (_loader)
        self._check_metric()
        self.foreground = cfg.method.name == "fsl"
        self.num_classes = 1 if self.foreground else (self._num_classes() or self.train_set.meta.num_classes)
        seed_everything(cfg.runtime.seed)
        self.model = self._model().to(self.device)
        self.adl_generator = None
        if cfg.method.name == "bgc":  # AttentiveDrop's settings and per-step draws (training_methods)
            self.model.drop_threshold, self.model.drop_prob = cfg.method.bgc_drop_for(self.model.layout.backbone)
            self.adl_generator = self.model.drop_generator = torch.Generator()
        if cfg.method.name == "adl":  # training-time layers on the plain network (training_methods)
            self.adl_generator = torch.Generator()
            attach_adl(self.model, cfg.method.adl_drop_rate, cfg.method.adl_threshold, self.adl_generator)
        if cfg.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg)
        self.calibration = None
        if cfg.method.name == "scm":  # SCM's layers: trained beside the network, kept in last.pt only
            self.calibration = SpatialCalibration().to(self.device)
            self.optimizer.add_param_group({"params": list(self.calibration.parameters()),
                                            "lr": group_lr(cfg.optim, True, None), "new_layer": True, "bias": None,
                                            "weight_decay": 0.0})
        #: each parameter group's (new layer, bias) kind, which sets its rate (group_lr)
        self._group_kinds = [(g["new_layer"], g["bias"]) for g in self.optimizer.param_groups]
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.start_epoch = 0
        self.best: dict[str, Any] = {"value": -math.inf, "epoch": None}
        if resume:
            self._resume()
        if self.ctx.enabled and self.device.type == "cuda":  # batch statistics over all ranks
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # what a training step calls: the network, for fsl its per-pixel foreground logits, for scm
        # the network through SCM's layers
        self.train_model = ForegroundLogits(self.model) if self.foreground else self.model
        if self.calibration is not None:
            self.train_model = ScmTraining(self.model, self.calibration)
        if self.ctx.enabled:
            # fsl's loss reaches the main branch alone: DDP must look for the other branches'
            # parameters, which get no gradient, or its second step fails
            unused = self.foreground and len(getattr(self.model, "branches", ())) > 1
            if unused:
                log.info("fsl on %d branches: DDP skips the parameters its loss does not reach",
                         len(self.model.branches))
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        if cfg.runtime.compile:
            self.train_model = torch.compile(self.train_model)

    # --- set-up -----------------------------------------------------------------------

    def _check_data(self) -> None:
        d = self.cfg.data
        root, meta = Path(d.root), Path(d.metadata)
        if not root.is_dir():
            raise ConfigError(f"data.root: {root} is not a folder")
        for split in ("train", "val"):
            if not (meta / split).is_dir():
                raise ConfigError(f"data.metadata: {meta / split} is missing (expected train/, val/ and test/ "
                                  "split folders in the wsolevaluation layout)")
        if d.mask_root is not None and not Path(d.mask_root).is_dir():
            raise ConfigError(f"data.mask_root: {d.mask_root} is not a folder")
        sizes = {"optim.batch_size": self.cfg.optim.batch_size}
        if self.cfg.method.name == "bgc" and self.cfg.method.bgc_warmup_batch_size is not None:
            sizes["method.bgc_warmup_batch_size"] = self.cfg.method.bgc_warmup_batch_size
        for key, size in sizes.items():
            if size % self.ctx.world:
                raise ConfigError(f"{key} {size} must be divisible by the {self.ctx.world} processes")

    def _check_metric(self) -> None:
        kind = self.val_set.meta.kind
        metric = self.cfg.eval.metric
        allowed = {"box": ("max_box_acc", "max_box_acc_v2", "gt_known_loc", "top1_loc", "top1_cls"),
                   "mask": ("pxap", "top1_cls")}.get(kind)
        if allowed is None:
            raise ConfigError(f"data.metadata: {Path(self.cfg.data.metadata) / 'val'} has no localization.txt; "
                              "validation needs boxes or masks")
        if metric not in allowed:
            raise ConfigError(f"eval.metric: {metric!r} is not computed on a {kind} split; choose one of {allowed}")
        if kind == "mask" and self.cfg.data.mask_root is None:
            raise ConfigError("data.mask_root: required, the val split is a mask split")

    def _class_names(self) -> list[str] | None:
        """The names in ``data.metadata/class_names.txt`` (``mnpo make-metadata`` writes it), if any."""
        path = Path(self.cfg.data.metadata) / CLASS_NAMES
        if not path.is_file():
            return None
        try:
            names = read_class_names(path)
        except AnnotationError as err:
            raise ConfigError(f"data.metadata: {err}") from None
        if self.cfg.data.num_classes is not None and len(names) != self.cfg.data.num_classes:
            raise ConfigError(f"data.num_classes: {self.cfg.data.num_classes}, but {path} names {len(names)} classes")
        return names

    def _num_classes(self) -> int | None:
        """``data.num_classes``, else the length of the class-name list, else ``None`` (from labels)."""
        return self.cfg.data.num_classes or (len(self.class_names) if self.class_names else None)

    def _datasets(self) -> tuple[WSOLDataset | ForegroundDataset, WSOLDataset]:
        d = self.cfg.data
        meta = Path(d.metadata)
        if self.cfg.method.name == "fsl":
            return self._fsl_datasets()
        train_meta = read_split(meta / "train", self._num_classes())
        transform = train_transform(d.crop_size, d.resize_size, random_resized=d.random_resized, draft=d.jpeg_draft)
        m = self.cfg.method
        train = WSOLDataset(d.root, train_meta, "train", transform, crop_size=d.crop_size,
                            resize_size=d.resize_size)
        val = WSOLDataset(d.root, meta / "val", "evaluate", num_per_class=d.val_per_class,
                          num_classes=self._num_classes() or train_meta.num_classes, mask_root=d.mask_root,
                          crop_size=d.crop_size, resize_size=d.resize_size, seed=self.cfg.runtime.seed,
                          uint8_views=True, ten_crop=False)
        return train, val

    def _fsl_datasets(self) -> tuple[ForegroundDataset, WSOLDataset]:
        """FSL: val minus ``fsl_holdout_per_class`` images per class to train on, those to validate
        on (also written as ``fsl-holdout/``, the split to calibrate the test evaluation on)."""
        d = self.cfg.data
        val = read_split(Path(d.metadata) / "val")
        holdout = subsample_per_class(val, self.cfg.method.fsl_holdout_per_class, seed=self.cfg.runtime.seed)
        kept = set(holdout.image_ids)
        train = val.select(i for i in val.image_ids if i not in kept)
        if len(train) == 0:
            raise ConfigError(f"method.fsl_holdout_per_class: {self.cfg.method.fsl_holdout_per_class} holds out "
                              "all of val; nothing is left to train on")
        if self.ctx.is_main:
            write_split(self.out / "fsl-holdout", holdout)
        log.info("fsl: training on %d val images, choosing on %d held out", len(train), len(holdout))
        train_set = ForegroundDataset(d.root, train, size=d.crop_size, mask_root=d.mask_root)
        val_set = WSOLDataset(d.root, holdout, "evaluate", mask_root=d.mask_root, crop_size=d.crop_size,
                              resize_size=d.resize_size, uint8_views=True, ten_crop=False)
        return train_set, val_set

    def _model(self) -> torch.nn.Module:
        m = self.cfg.model
        layout = LAYOUTS[m.layout](m.width) if m.layout in LAYOUTS else NetworkLayout.from_yaml(m.layout)
        if network_kind(layout) == "acol":
            layout = dataclasses.replace(layout, acol_threshold=self.cfg.method.acol_threshold)
        if m.large_feature_map:
            layout = dataclasses.replace(layout, large_feature_map=True)
        if m.drop_path:
            layout = dataclasses.replace(layout, drop_path=m.drop_path)
        with local_main_first(self.ctx, "pretrained-weights"):  # one download per node
            return build_model(layout, self.num_classes, pretrained=m.pretrained,
                               imagenet_classifier=m.imagenet_classifier)

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume (no last checkpoint in runtime.out)")
        payload = load_plain(path)
        state = payload.get("training")
        if not isinstance(state, dict):
            raise ValueError(f"{path}: a checkpoint without training state cannot be resumed")
        model = model_from_payload(payload, str(path), layout=self.model.layout, num_classes=self.num_classes)
        self.model.load_state_dict(model.state_dict())
        if self.calibration is not None:
            if "scm" not in state:
                raise ValueError(f"{path}: method scm resumes SCM's layers, but this checkpoint has none "
                                 "(it was trained with another method)")
            self.calibration.load_state_dict(state["scm"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_new_learning_rates(state.get("config", {}).get("optim", {}))
        self.start_epoch = int(state["epoch"])
        self.best = dict(state["best"])
        set_rng_state(state["rng"])
        log.info("resumed from %s after epoch %d", path, self.start_epoch)

    def _apply_new_learning_rates(self, saved: dict) -> None:
        """A resumed run whose config changed ``optim.lr`` / ``new_layer_lr_ratio`` continues at the
        new rates (scaled by the schedule's decay so far), as a user lowering the rate expects."""
        o = self.cfg.optim
        saved = {**dataclasses.asdict(o), **saved}  # settings the saved config lacks are today's
        new = [group_lr(o, *kind) for kind in self._group_kinds]
        old = [group_lr(saved, *kind) for kind in self._group_kinds]
        if new == old:
            return
        log.warning("resuming with learning rates %s instead of the run's %s", new, old)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] *= new[i] / old[i]
            group["initial_lr"] = new[i]
        self.scheduler.base_lrs = list(new)

    # --- the loop ---------------------------------------------------------------------

    def batch_size(self, epoch: int) -> int:
        """The global batch of ``epoch``: ``optim.batch_size``, or BGC's warm-up batch before its
        warm-up ends (``method.bgc_warmup_batch_size``)."""
        m = self.cfg.method
        if m.name == "bgc" and m.bgc_warmup_batch_size is not None and epoch < m.bgc_warmup_epochs:
            return m.bgc_warmup_batch_size
        return self.cfg.optim.batch_size

    def _loader(self, epoch: int):
        """The run's loader (:func:`~mnpo.engine.train_input.training_loader`), set to ``epoch``:
        one for the whole run, or a new one where the batch size changes (BGC's warm-up)."""
        per_rank = self.batch_size(epoch) // self.ctx.world
        if self.loader is None or self.loader.batch_size != per_rank:
            seed = self.cfg.runtime.seed
            sampler = EpochSampler(len(self.train_set), self.ctx.world, self.ctx.rank, seed)
            items = TrainingItems(self.train_set, seed, hide=self.hide)
            self.loader = training_loader(items, sampler, per_rank, self.cfg.data.workers, self.device, seed)
        self.loader.sampler.set_epoch(epoch)
        return self.loader

    def train_epoch(self, epoch: int) -> EpochStats:
        self.train_model.train()
        loader = self._loader(epoch)
        sums = StepSums(self.device)
        skipped = 0
        checked = 0  # steps before this one were read and were finite
        start = time.perf_counter()
        bar = None
        if self.progress and self.ctx.is_main:
            from tqdm import tqdm
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", unit="batch", dynamic_ncols=True)
        log_every = self.cfg.runtime.log_every
        step = -1
        for step, batch in enumerate(bar or loader):
            skipped += len(batch["skipped"])
            if "image" in batch:
                loss, hits = self._batch_loss(batch, epoch, step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.optim.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
                self.optimizer.step()
                sums.add(step, loss, hits, len(batch["label"]))
            if (step + 1) % log_every == 0:
                total_loss, correct, _, _ = self._check_finite(sums, epoch, checked, step)
                checked = step + 1
                if bar is not None and sums.images:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{total_loss / sums.images:.4f}", acc=f"{100 * correct / sums.images:.1f}",
                                    img_s=f"{sums.images * self.ctx.world / max(elapsed, 1e-9):.0f}")
        total_loss, correct, _, _ = self._check_finite(sums, epoch, checked, step)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        total_loss, correct, seen, skipped = all_reduce_sum(
            np.array([total_loss, correct, sums.images, skipped], np.float64), self.ctx).tolist()
        seen, skipped = int(seen), int(skipped)
        return EpochStats(total_loss / max(seen, 1), 100.0 * correct / max(seen, 1), seen, skipped, seconds)

    def _check_finite(self, sums: StepSums, epoch: int, first: int, last: int) -> tuple[float, float, int, float]:
        """Read the sums; stop the run if a loss among steps ``first..last`` (0-based) was not finite."""
        values = sums.read()
        bad_step, bad_loss = values[2], values[3]
        if bad_step >= 0:
            raise FloatingPointError(
                f"training diverged: the loss is {bad_loss} at epoch {epoch + 1}, step {bad_step + 1} (found when "
                f"steps {first + 1}-{last + 1} were checked, every runtime.log_every = {self.cfg.runtime.log_every} "
                f"steps); lower optim.lr (now {self.cfg.optim.lr}) or set optim.clip_grad_norm, and resume or "
                "restart (last.pt keeps the last finished epoch)")
        return values

    def _draw_seed(self, epoch: int, step: int) -> int:
        """The seed of a step's training-time random draws: ADL's (one per batch) the same on every
        rank, BGC's AttentiveDrop (one per pixel of each image) a rank's own, since each rank's
        images are others; a function of (seed, epoch, step[, rank]) alone, so resume repeats it."""
        key = [self.cfg.runtime.seed, epoch, step]
        if self.cfg.method.name == "bgc":
            key.append(self.ctx.rank)
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def _batch_loss(self, batch: dict[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training method's loss on one batch, and its hits: images classified right, or for
        ``fsl`` the batch's images times the fraction of pixels classified right (0-dim tensors on
        the device)."""
        images = device_images(batch, self.device, self.hide, self.cfg.runtime.channels_last)
        labels = batch["label"].to(self.device, non_blocking=True)
        m = self.cfg.method
        partner_labels, lam = None, 1.0
        if self.adl_generator is not None:
            self.adl_generator.manual_seed(self._draw_seed(epoch, step))
        if m.name == "cutmix":
            rng = np.random.default_rng([self.cfg.runtime.seed, epoch, step])  # the same on every rank
            images, partner_labels, lam = cutmix_batch(images, labels, m.cutmix_beta, m.cutmix_prob, rng)
        with autocast(self.device, self.precision):
            if self.foreground:
                check_foreground_targets(batch["target"], batch["image_id"])  # on the host: no sync
                pixel_logits = self.train_model(images)
                loss, accuracy = foreground_loss(pixel_logits, batch["target"].to(self.device, non_blocking=True))
                return loss, accuracy * len(labels)
            if m.name == "spg":
                out = self.train_model(images, return_features=True, labels=labels)
                logits = out.logits
                loss = spg_loss(logits[0], out.features, labels, self.model.classifier, m.spg_thresholds,
                                tuple(images.shape[-2:]))
            elif m.name == "bas":  # the label's generator map drives the background branch
                out = self.train_model(images, return_features=True, labels=labels)
                logits = out.logits
                beta, lambda_fg = m.bas_weights_for(self.model.layout.backbone)
                loss = bas_loss(logits[0], out.features, labels, beta, lambda_fg)
            elif m.name == "bgc":  # the erased pass runs with the labels; sim and norm after the warm-up
                out = self.train_model(images, return_features=True, labels=labels)
                logits = out.logits
                loss = bgc_loss(logits[0], out.features, labels, self.model.classifier.weight,
                                m.bgc_weights_for(self.model.layout.backbone), m.bgc_dataset,
                                warm=epoch < m.bgc_warmup_epochs)
            elif m.name == "scm":  # CE of the logits after SCM's calibration of the semantic maps
                logits = (self.train_model(images),)
                loss = F.cross_entropy(logits[0].float(), labels)
            elif m.name == "sat":  # its map's area and smoothness terms beside CE
                out = self.train_model(images, return_features=True)
                logits = out.logits
                loss = sat_loss(logits[0], out.features["sat_map"], labels, m.sat_area)
            elif m.name == "acol":  # the labels steer the erasing of branch B's input
                logits = self.train_model(images, labels=labels).logits
                loss = wsol_loss(logits, labels)
            else:
                logits = self.train_model(images).logits
                loss = (wsol_loss(logits, labels) if partner_labels is None
                        else mixed_loss(logits, labels, partner_labels, lam))
        return loss, (logits[0].argmax(1) == labels).sum()

    def validate(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Oracle metrics on val (per-epoch selection) and the classification accuracy."""
        e = self.cfg.eval
        result = evaluate_model(self.model, self.val_set, thresholds=cam_thresholds(e.cam_curve_interval),
                                method=e.method, device=self.device, precision=self.precision,
                                batch_size=e.batch_size, workers=self.cfg.data.workers, ten_crop=False,
                                channels_last=self.cfg.runtime.channels_last,
                                ctx=self.ctx, foreground=self.foreground, skip_unreadable=True)
        if result.unreadable and self.ctx.is_main:  # misses: the selection still compares like with like
            log.warning("val: %d unreadable image(s) counted as misses: %s", len(result.unreadable),
                        "; ".join(list(result.unreadable.values())[:5]))
        report = build_report(result.curves, None, {})
        values = {k: m.value for k, m in report.oracle.items()}
        if not self.foreground:
            values.update(result.classification)
        thresholds = {k: m.threshold for k, m in report.oracle.items()}
        return values, thresholds

    def fit(self) -> dict[str, Any]:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        writer = self._tensorboard()
        last: dict[str, Any] = {}
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            groups = self.optimizer.param_groups
            lrs = [next((g["lr"] for g in groups if g.get("new_layer") == new), groups[0]["lr"]) for new in (False, True)]
            with cudnn_autotune(self.device):  # training's input shapes are fixed; validation keeps the default
                stats = self.train_epoch(epoch)
            self.scheduler.step()
            values, thresholds = self.validate()
            metric = self.cfg.eval.metric
            if metric not in values:
                raise ConfigError(f"eval.metric: {metric!r} is not computed on this split; it has {sorted(values)}")
            improved = values[metric] > self.best["value"]
            if improved:
                self.best = {"value": values[metric], "epoch": epoch + 1}
            row = {"epoch": epoch + 1, "lr": lrs[0], "lr_new_layers": lrs[1], "train_loss": stats.loss,
                   "train_acc": stats.accuracy, "train_images": stats.images, "skipped_images": stats.skipped,
                   "images_per_s": stats.images / max(stats.seconds, 1e-9),
                   **{f"val_{k}": v for k, v in values.items()}}
            last = row
            if self.ctx.is_main:
                self._write_row(row)
                if writer is not None:
                    for k, v in row.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
                meta = {"val_metrics": values, "epoch": epoch + 1,
                        "operating_threshold": thresholds.get("max_box_acc"),
                        "task": "foreground" if self.foreground else "classification"}
                if self.foreground:
                    meta["class_names"] = ["foreground"]
                elif self.class_names is not None:
                    meta["class_names"] = self.class_names
                training = {"epoch": epoch + 1, "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), "best": self.best, "rng": rng_state(),
                            **({"scm": self.calibration.state_dict()} if self.calibration is not None else {}),
                            "config": self.cfg.to_dict()}
                save_checkpoint(self.out / "last.pt", self.model, meta=meta, training=training)
                if improved:
                    save_checkpoint(self.out / "best.pt", self.model, meta=meta)
                log.info("epoch %d: loss %.4f, train acc %.2f, val %s %.2f%s", epoch + 1, stats.loss,
                         stats.accuracy, metric, values[metric], " (best)" if improved else "")
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch + 1)
        if writer is not None:
            writer.close()
        return last

    def _write_row(self, row: dict[str, Any]) -> None:
        path = self.out / "metrics.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < row["epoch"]]
        rows.append(row)
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.csv only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))
