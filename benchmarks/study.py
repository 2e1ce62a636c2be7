"""The synthetic study: does MNPO localize the whole object where CAM finds only the part?

For each preset (``parts``: the class is only a small mark on a shared body; ``shapes``: the
class is the object's own shape), train from scratch

* the released two-branch VGG16 layout (``vgg16-mnpo``), and
* its main branch alone (``vgg16-cam``, the one-branch ablation),

then evaluate on the test split, thresholds calibrated on val and oracle:

* two-branch: CAM, Grad-CAM, DGL, MNPO, MNPOs, and the ablations MNPO with H off
  (``a = b``) and MNPOs with H off; with ``--cam-family`` also Grad-CAM++, XGrad-CAM,
  LayerCAM, HiResCAM, Score-CAM, Ablation-CAM and Eigen-CAM;
* one-branch: CAM, MNPO (= H on a single branch), DGL (= MNPOs' gradient post-processing on
  one branch, H off) and DGL with H on;

and, chosen with ``--models``, wsolevaluation's training methods and baselines beside them:
``vgg16-cam+has``, ``vgg16-cam+cutmix`` and ``vgg16-cam+adl`` (the one-branch network trained
with HaS / CutMix / ADL, scored by CAM), ``vgg16-acol`` and ``vgg16-spg`` (ACoL's and SPG's own
networks, scored by their own maps; ACoL also by MNPO's fusion of its two branches),
``vgg16-bas`` (BAS: its generator's map, the mean over all classes' maps as its CUB protocol, and
Grad-CAM of its head, which is CAM there; trained with the CUB loss weights), ``vgg16-bgc``
(BGC, its CAM; warm-up for the first third of the epochs, as the authors' 20 of 70),
``vgg16-cam+fsl`` (the few-shot fully supervised baseline: trained on val's
boxes minus one image per class, calibrated on that held-out image) and ``center`` (the
center baseline: no network, thresholds calibrated on val).

Beside MaxBoxAccV2, each row of a network is scored for faithfulness to it on the test split
(``--faithfulness``, default Average Drop / Increase in Confidence, Deletion and Insertion AUC
over ``--faithfulness-steps`` steps, pointing game and energy; ``road`` adds ROAD combined at
10 .. 90 %, 18 sparse solves per test image and row on the CPU, 0.02 to 0.4 s each at 224 px;
``mnpo.engine.faithfulness``), and each network gets two more rows, ``random map`` and
``center map``: the same metrics of those baselines' maps on the same network, the scale to read
the others against. An FSL network (no classes) and the center baseline have no faithfulness.

    python benchmarks/study.py [--presets parts,shapes] [--image-size 224] [--classes 8]
        [--train-per-class 200] [--epochs 30] [--batch 64] [--width 1.0] [--device auto]
        [--train-seeds 0,1,2] [--cam-family] [--models vgg16-mnpo,vgg16-cam,...]
        [--faithfulness avgdrop,deletion,insertion,pointing[,road]|none] [--faithfulness-steps 28] [--out study-output]

Writes ``OUT/study.md`` (the table: mean ± standard deviation over the training seeds, on one
synthetic data set), ``OUT/study.json`` (every seed's numbers too) and ``OUT/figure-PRESET.png``
(overlays of CAM, DGL, MNPO and MNPOs on a few test images: the two-branch network of the first
training seed, boxes at the thresholds calibrated on val). The table is rewritten after each
preset and layout, so a run cut short keeps what it finished. ``--merge A/study.json B/study.json
--out OUT`` writes one table from runs made apart (other seeds or models, the same settings). Meant for a GPU at 224 px; on a
CPU, shrink it (``--image-size 64 --width 0.125 --train-per-class 40 --epochs 5``) to check it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from mnpo.data.dataset import WSOLDataset
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.config import config_from_dict
from mnpo.engine.demo import method_gallery
from mnpo.engine.evaluate import evaluate_model
from mnpo.engine.views import resize_for
from mnpo.engine.evaluate_maps import build_report
from mnpo.engine.faithfulness import BASELINES, SUMMARY_NAMES, FaithfulnessSettings
from mnpo.engine.runtime import resolve_device, resolve_precision
from mnpo.engine.train import Trainer
from mnpo.io import atomic_path, write_json_atomic
from mnpo.metrics.boxes import cam_thresholds
from mnpo.models import load_model

from machine_info import device_summary

log = logging.getLogger("study")

#: (row label, method, map options) per model
EVALUATIONS = {
    "vgg16-mnpo": [
        ("CAM", "cam", {}),
        ("Grad-CAM", "gradcam", {}),
        ("DGL", "dgl", {}),
        ("MNPO", "mnpo", {}),
        ("MNPO, H off", "mnpo", {"a": 1.0, "b": 1.0}),
        ("MNPOs", "mnpos", {}),
        ("MNPOs, H off", "mnpos", {"a": 1.0, "b": 1.0}),
    ],
    "vgg16-cam": [
        ("CAM", "cam", {}),
        ("MNPO (H on one branch)", "mnpo", {}),
        ("DGL", "dgl", {}),
        ("DGL, H on", "dgl", {"a": 8.0, "b": 4.0}),
    ],
}


#: ``--models`` beyond EVALUATIONS: (layout, training method, rows); ``center`` trains nothing
WSOL_MODELS = {
    "vgg16-cam+has": ("vgg16-cam", {"name": "has"}, [("CAM", "cam", {})]),
    "vgg16-cam+cutmix": ("vgg16-cam", {"name": "cutmix"}, [("CAM", "cam", {})]),
    "vgg16-cam+adl": ("vgg16-cam", {"name": "adl"}, [("CAM", "cam", {})]),
    "vgg16-cam+fsl": ("vgg16-cam", {"name": "fsl"}, [("FSL", "cam", {})]),
    "vgg16-acol": ("vgg16-acol", {"name": "acol"}, [("ACoL", "cam", {}), ("MNPO on A and B", "mnpo", {})]),
    "vgg16-spg": ("vgg16-spg", {"name": "spg"}, [("SPG", "cam", {})]),
    # BAS: its generator's map (cam), the mean of the top-k classes' maps (its CUB protocol; k =
    # the number of classes here, as theirs on CUB's ResNet50 and InceptionV3), and CAM of its head
    "vgg16-bas": ("vgg16-bas", {"name": "bas"}, [("BAS", "cam", {}), ("BAS, top-k mean", "cam", {"top_k": "all"}),
                                                ("CAM of BAS's head", "gradcam", {})]),
    "vgg16-bgc": ("vgg16-bgc", {"name": "bgc", "bgc_warmup_epochs": "third"}, [("BGC", "cam", {})]),
    # the transformer line (issue 24, TRANSFORMER_MODELS below): DeiT-Tiny (the CPU study) or DeiT-S
    # (the GPU session) networks, AdamW (TRANSFORMER_TRAINING)
    "center": (None, None, [("center baseline", "center", {})]),
}
#: TS-CAM's map, MNPO's weight post-processing on its conv head and MNPOs at blocks.10 beside it;
#: SAT's map; SCM's network, tested with TS-CAM's map
TRANSFORMER_MODELS = {
    f"{size}-{name}": (f"{size}-{layout}", method, rows) for size in ("deit_tiny", "deit_small")
    for name, layout, method, rows in (
        ("tscam", "tscam", {"name": "tscam"},
         [("TS-CAM", "cam", {}), ("MNPO on TS-CAM", "mnpo", {}), ("MNPOs on TS-CAM", "mnpos", {}),
          ("Grad-CAM of TS-CAM's head", "gradcam", {})]),
        ("sat", "sat", {"name": "sat", "sat_area": 0.25}, [("SAT", "cam", {}), ("MNPO on SAT", "mnpo", {})]),
        ("tscam+scm", "tscam", {"name": "scm"}, [("SCM (TS-CAM's map)", "cam", {})]))
}
WSOL_MODELS.update(TRANSFORMER_MODELS)
MODEL_NAMES = (*EVALUATIONS, *WSOL_MODELS)
#: what the transformer networks train with instead of the CNNs' SGD: AdamW with timm's decay groups,
#: weight decay 0.05 and drop-path 0.1 (TS-CAM's, SAT's and SCM's), the rate of --transformer-lr and
#: the width of --transformer-width (1: DeiT-Tiny itself)
TRANSFORMER_TRAINING = {"optimizer": "adamw", "weight_decay": 0.05, "drop_path": 0.1}


def backbone_source(name: str, layout: str | None, backbone_from: str | None) -> str | None:
    """The model whose trained backbone ``name`` starts from (``--backbone-from``): every trained
    model but the source itself and those on another backbone; None: from scratch."""
    if backbone_from is None or layout is None or name == backbone_from:
        return None
    source_layout, _, _ = model_plan(backbone_from)
    if source_layout is None:
        raise SystemExit(f"study: --backbone-from {backbone_from!r} trains no network")
    if source_layout.split("-")[0] != layout.split("-")[0]:
        raise SystemExit(f"study: --backbone-from {backbone_from} is a {source_layout.split('-')[0]} network; "
                         f"{name} is built on {layout.split('-')[0]}")
    return backbone_from


def model_plan(name: str) -> tuple[str | None, dict, list]:
    """(layout, training method, rows) of a ``--models`` entry."""
    if name in EVALUATIONS:
        return name, {}, EVALUATIONS[name]
    if name in WSOL_MODELS:
        layout, method, rows = WSOL_MODELS[name]
        return layout, dict(method or {}), rows
    raise SystemExit(f"study: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


#: ``--cam-family`` rows (two-branch network, at ``head``): the post-hoc CAM family
CAM_FAMILY_ROWS = [
    ("Grad-CAM++", "gradcampp", {}),
    ("XGrad-CAM", "xgradcam", {}),
    ("LayerCAM", "layercam", {}),
    ("HiResCAM", "hirescam", {}),
    ("Score-CAM", "scorecam", {}),
    ("Ablation-CAM", "ablationcam", {}),
    ("Eigen-CAM", "eigencam", {}),
]

#: how ``--normalize`` names a normalization in a row's label
NORMALIZATION_LABELS = {"max": "max", "pas": "PaS", "ivr": "IVR"}


def normalization_rows(rows: list, modes: str) -> list:
    """``rows`` with, after each CAM row (method ``cam``: CAM, ACoL's, SPG's, FSL's map), one row per
    normalization in ``modes`` (comma-separated, from max, pas, ivr; ``none``: no row added) that
    scores the same map normalized that way (``MapOptions.normalize``; every other row is min-max's)."""
    chosen = [] if modes == "none" else modes.split(",")
    for mode in chosen:
        if mode not in NORMALIZATION_LABELS:
            raise SystemExit(f"study: --normalize {mode!r}: choose from {', '.join(NORMALIZATION_LABELS)} or none "
                             "(min-max is every row's)")
    out = []
    for label, method, options in rows:
        out.append((label, method, options))
        if method == "cam":
            out += [(f"{label}, {NORMALIZATION_LABELS[m]}", method, {**options, "normalize": m}) for m in chosen]
    return out


#: the rows drawn in the figure (two-branch network, first training seed)
FIGURE_ROWS = ("CAM", "DGL", "MNPO", "MNPOs")


def backbone_file(checkpoint: Path) -> Path:
    """The backbone of a finished run's checkpoint as a torchvision-named state dict (what
    ``model.pretrained: FILE`` reads), next to it: ``backbone.pth``."""
    target = checkpoint.parent / "backbone.pth"
    if not target.is_file():
        model, _ = load_model(checkpoint)
        with atomic_path(target) as tmp:
            torch.save(model.backbone.state_dict(), tmp)
    return target


def run_name(preset: str, name: str, seed: int, backbone_from: str | None) -> str:
    """A training run's folder: ``PRESET-MODEL-seedS``, or ``PRESET-MODEL@SOURCE-seedS`` for a
    model started from SOURCE's backbone (``--backbone-from``)."""
    return f"{preset}-{name}{'@' + backbone_from if backbone_from else ''}-seed{seed}"


def train(data: Path, out: Path, layout: str, args, seed: int, method: dict | None = None,
          pretrained: Path | None = None, reuse: bool = False) -> Path:
    """Train one run into ``out`` (``--resume`` or ``reuse``: continue, or keep, what ``out``
    holds); its ``best.pt``."""
    method = dict(method or {})
    if method.get("bgc_warmup_epochs") == "third":
        method["bgc_warmup_epochs"] = args.epochs * 2 // 7  # the authors' 20 of 70
    fsl = method.get("name") == "fsl"  # chosen on its held-out val images by localization: no classes
    epochs = args.fsl_epochs if fsl and args.fsl_epochs else args.epochs
    transformer = layout.startswith("deit_")
    model = {"layout": layout, "width": args.transformer_width if transformer else args.width,
             "pretrained": None if pretrained is None else str(pretrained)}
    optim = {"epochs": epochs, "batch_size": args.batch, "lr": args.lr, "new_layer_lr_ratio": 1.0,
             "lr_milestones": [max(1, epochs * 3 // 4)], "clip_grad_norm": args.clip_grad_norm}
    if transformer:
        model["drop_path"] = TRANSFORMER_TRAINING["drop_path"]
        optim.update(optimizer=TRANSFORMER_TRAINING["optimizer"], weight_decay=TRANSFORMER_TRAINING["weight_decay"],
                     lr=args.transformer_lr)
    cfg = config_from_dict({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": args.workers,
                 "resize_size": resize_for(args.image_size), "crop_size": args.image_size},
        "model": model,
        "optim": optim,
        "method": method,
        "eval": {"method": "cam", "metric": "max_box_acc_v2" if fsl else "top1_cls", "batch_size": args.batch},
        "runtime": {"out": str(out), "device": args.device, "seed": seed},
    }, source="study")
    resume = (args.resume or reuse) and (out / "last.pt").is_file()  # a finished run resumes to no epochs at all
    Trainer(cfg, resume=resume, progress=not args.quiet).fit()
    return out / "best.pt"


def evaluate_center(data: Path, rows) -> list[dict]:
    """The center baseline's metrics (no network: no classification, no Top-1 Loc)."""
    from mnpo.data.metadata import read_split
    from mnpo.engine.evaluate_maps import evaluate_split

    curves = {split: evaluate_split(None, read_split(data / "metadata" / split), thresholds=cam_thresholds(0.01))
              for split in ("val", "test")}
    report = build_report(curves["test"], curves["val"], {})
    (label, method, options), = rows
    return [{"label": label, "method": method, "options": options, "top1_cls": float("nan"),
             **{f"{p}_{k}": getattr(report, p)[k].value if k in getattr(report, p) else float("nan")
                for p in ("oracle", "calibrated") for k in ("gt_known_loc", "top1_loc", "max_box_acc_v2")}}]


#: the rows of the baselines' maps scored for faithfulness on each network: (label, source)
BASELINE_ROWS = (("random map", "random"), ("center map", "center"))


def faithfulness_settings(args, baselines: bool) -> FaithfulnessSettings | None:
    """The study's faithfulness pass (None with ``--faithfulness none``); ``baselines``: also
    score the random and center maps (once per network: they do not depend on the method)."""
    if args.faithfulness == "none":
        return None
    return FaithfulnessSettings(metrics=args.faithfulness, steps=args.faithfulness_steps, seed=args.seed,
                                chunk_size=args.batch, baselines=BASELINES if baselines else ())


def _faithfulness_values(result: dict | None, source: str) -> dict[str, float]:
    summary = (result or {}).get("summary", {}).get(source, {})
    return {key: summary.get(key, float("nan")) for key in SUMMARY_NAMES}


def evaluate(checkpoint: Path, data: Path, rows, args, shown=(), kept=None) -> list[dict]:
    """Every row's metrics on the test split (thresholds calibrated on val and oracle), and its
    maps' faithfulness (:func:`faithfulness_settings`), followed by the rows of the random and
    center maps (:data:`BASELINE_ROWS`; faithfulness alone). With ``kept``: also
    ``kept[label] = {image_id: map}`` for the test images in ``shown`` and
    ``kept["thresholds"][label]``, the calibrated MaxBoxAcc threshold, for the figure. An FSL
    checkpoint (a foreground model) is calibrated on the val images it held out, and has no
    classification and no faithfulness."""
    device = resolve_device(args.device)
    precision = resolve_precision("fp32" if args.fp32_maps else "auto", device)
    model, payload = load_model(checkpoint)
    model.to(device)
    foreground = payload["meta"].get("task") == "foreground"
    kwargs = dict(crop_size=args.image_size, resize_size=resize_for(args.image_size), uint8_views=True)
    val_meta = checkpoint.parent / "fsl-holdout" if foreground else data / "metadata" / "val"
    val = WSOLDataset(data / "images", val_meta, "evaluate", **kwargs)
    test = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate", **kwargs)
    results, baselines = [], None
    for index, (label, method, options) in enumerate(rows):
        if options.get("top_k") == "all":  # BAS's mean over every class's map
            options = {**options, "top_k": args.classes}
        faithfulness = None if foreground else faithfulness_settings(args, baselines=index == 0)
        common = dict(thresholds=cam_thresholds(0.01), method=method, map_options=options, device=device,
                      precision=precision, batch_size=args.batch, workers=args.workers, foreground=foreground)
        maps = {}

        def keep(batch, batch_maps, maps=maps):
            maps.update((i, m) for i, m in zip(batch["image_id"], batch_maps) if i in shown)

        v = evaluate_model(model, val, **common)
        t = evaluate_model(model, test, on_batch=keep if kept is not None else None, faithfulness=faithfulness,
                           **common)
        if index == 0 and faithfulness is not None:
            baselines = t.faithfulness
        report = build_report(t.curves, v.curves, {})
        if kept is not None and label in FIGURE_ROWS:
            kept[label] = maps
            kept.setdefault("thresholds", {})[label] = report.calibrated["max_box_acc"].threshold
        top1 = float("nan") if foreground else t.classification["top1_cls"]
        results.append({"label": label, "method": method, "options": options, "top1_cls": top1,
                        **{f"{p}_{k}": getattr(report, p)[k].value if k in getattr(report, p) else float("nan")
                           for p in ("oracle", "calibrated") for k in ("gt_known_loc", "top1_loc", "max_box_acc_v2")},
                        **_faithfulness_values(t.faithfulness, "maps")})
    if baselines is not None:
        nan = float("nan")
        for label, source in BASELINE_ROWS:
            results.append({"label": label, "method": source, "options": {}, "top1_cls": nan,
                            **{k: nan for k in LOCALIZATION_METRICS}, **_faithfulness_values(baselines, source)})
    return results


LOCALIZATION_METRICS = ("calibrated_gt_known_loc", "oracle_gt_known_loc", "calibrated_top1_loc", "oracle_top1_loc",
                        "calibrated_max_box_acc_v2", "oracle_max_box_acc_v2")
#: what the table summarizes per row; the faithfulness keys are absent from runs made without it
METRICS = ("top1_cls", *LOCALIZATION_METRICS, *SUMMARY_NAMES)


def summarize(runs: list[list[dict]]) -> list[dict]:
    """Per row (method): the mean and the standard deviation over the training seeds."""
    rows = []
    for per_seed in zip(*runs):
        row = {"label": per_seed[0]["label"]}
        for key in METRICS:
            values = np.array([r.get(key, float("nan")) for r in per_seed])
            row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)
        rows.append(row)
    return rows


def _cell(value: tuple[float, float | None], digits: int = 1) -> str:
    mean, std = value
    if np.isnan(mean):
        return "-"  # not computed (no classification: a baseline without classes; no faithfulness)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


#: the faithfulness columns: (header, the keys shown in it, decimals); arrows mark lower-is-better
FAITHFULNESS_COLUMNS = (("Avg Drop % ↓ / Incr Conf %", ("average_drop", "increase_in_confidence"), 1),
                        ("Deletion ↓ / Insertion AUC", ("deletion_auc", "insertion_auc"), 3),
                        ("ROAD combined", ("road_combined",), 3),
                        ("Pointing / Energy %", ("pointing_game", "pointing_energy"), 1))


def table(summary: dict) -> str:
    """The markdown table; the faithfulness columns where any row has one of their values."""
    nan = (float("nan"), None)
    every = [r for rows in summary.values() for r in rows]
    shown = [c for c in FAITHFULNESS_COLUMNS if any(not np.isnan(r.get(k, nan)[0]) for r in every for k in c[1])]
    lines = ["| preset | model | maps | top-1 cls | GT-known Loc cal. / oracle | Top-1 Loc cal. / oracle "
             "| MaxBoxAccV2 cal. / oracle |" + "".join(f" {header} |" for header, _, _ in shown),
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(shown)]
    for (preset, layout), rows in summary.items():
        for r in rows:
            lines.append(
                f"| {preset} | {layout} | {r['label']} | {_cell(r['top1_cls'])} | "
                f"{_cell(r['calibrated_gt_known_loc'])} / {_cell(r['oracle_gt_known_loc'])} | "
                f"{_cell(r['calibrated_top1_loc'])} / {_cell(r['oracle_top1_loc'])} | "
                f"{_cell(r['calibrated_max_box_acc_v2'])} / {_cell(r['oracle_max_box_acc_v2'])} |"
                + "".join(f" {' / '.join(_cell(r.get(k, nan), digits) for k in keys)} |" for _, keys, digits in shown))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="parts,shapes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip-grad-norm", type=float, default=None,
                        help="clip the gradients' L2 norm (default off; VGG16 without BatchNorm can diverge)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--transformer-lr", type=float, default=5e-4,
                        help="AdamW's rate for the DeiT models (deit_tiny-*; the CNNs train at --lr)")
    parser.add_argument("--transformer-width", type=float, default=1.0,
                        help="width of the DeiT models (1: DeiT-Tiny itself; --width is the CNNs')")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--train-seeds", default="0", help="comma-separated training seeds; the table gives "
                        "mean ± standard deviation over them")
    parser.add_argument("--figure-images", type=int, default=6, help="test images per row of figure-PRESET.png")
    parser.add_argument("--resume", action="store_true", help="continue each training run from its last.pt "
                        "in OUT where there is one (a finished run is not trained again)")
    parser.add_argument("--fp32-maps", action="store_true", help="maps in fp32 even where bf16 is available")
    parser.add_argument("--cam-family", action="store_true",
                        help="also score Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Ablation-CAM "
                        "and Eigen-CAM on the two-branch network")
    parser.add_argument("--fsl-epochs", type=int, default=None,
                        help="epochs of vgg16-cam+fsl, which trains on val only (default: --epochs)")
    parser.add_argument("--models", default="vgg16-mnpo,vgg16-cam",
                        help=f"comma-separated, from {', '.join(MODEL_NAMES)} (default vgg16-mnpo,vgg16-cam)")
    parser.add_argument("--faithfulness", default="avgdrop,deletion,insertion,pointing",
                        help="faithfulness metrics of every row on the test split (as mnpo evaluate "
                             "--faithfulness; add road for ROAD, whose sparse solves cost 0.02 to 0.4 s each "
                             "at 224 px, 18 per image and row), or 'none'")
    parser.add_argument("--faithfulness-steps", type=int, default=28,
                        help="deletion / insertion steps (default 28: 1,792 pixels a step at 224; the papers' 112 "
                             "quadruples their cost)")
    parser.add_argument("--normalize", default="ivr",
                        help="after each CAM row, a row per normalization listed (max, pas, ivr; comma-separated) "
                             "scoring the same map normalized so (IVR: percentile 0.45), or 'none'; every other "
                             "row is min-max normalized (default ivr)")
    parser.add_argument("--merge", nargs="+", metavar="STUDY_JSON",
                        help="write one table (OUT/study.md, study.json) from these runs' study.json files, "
                             "each (preset, model) pooled over the training seeds they hold; trains nothing")
    parser.add_argument("--backbone-from", default=None, metavar="MODEL",
                        help="start every other trained model from the backbone of MODEL's run of the same preset "
                             "and seed (e.g. vgg16-cam: a stand-in for ImageNet weights, which BAS and BGC assume; "
                             "their rows read 'MODEL from SOURCE'); default: all from scratch")
    parser.add_argument("--out", default="study-output")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        print(merge(args.merge, out))
        return
    seeds = [int(x) for x in args.train_seeds.split(",")]
    device = device_summary(resolve_device(args.device))
    start = time.perf_counter()
    all_results: dict[tuple[str, str], list[list[dict]]] = {}
    run_seeds: dict[tuple[str, str], list[int] | None] = {}  # the training seeds of each key's runs
    diverged: list[str] = []
    for preset in args.presets.split(","):
        data = out / preset
        write_synthetic_dataset(out=data, preset=preset, seed=args.seed, image_size=args.image_size,
                                num_classes=args.classes, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, test_per_class=args.test_per_class)
        test = WSOLDataset(data / "images", data / "metadata" / "test", "evaluate")  # for the figure
        shown = test.image_ids[:: max(1, len(test) // args.figure_images)][: args.figure_images]
        for name in args.models.split(","):
            layout, method, rows = model_plan(name)
            if args.cam_family and name == "vgg16-mnpo":
                rows = rows + CAM_FAMILY_ROWS
            if layout is not None:
                rows = normalization_rows(rows, args.normalize)
            if layout is None:  # the center baseline: nothing to train, the same for every seed
                all_results[(preset, name)] = [evaluate_center(data, rows)]
                run_seeds[(preset, name)] = None
                text = write_results(out, all_results, diverged, args, run_seeds, device,
                                     f"{time.perf_counter() - start:.0f} s")
                continue
            source = backbone_source(name, layout, args.backbone_from)
            runs, trained = [], []
            for seed in seeds:
                try:
                    pretrained = None
                    if source is not None:  # the source's run of this preset and seed (trained here if absent)
                        source_layout, source_method, _ = model_plan(source)
                        pretrained = backbone_file(train(data, out / run_name(preset, source, seed, None),
                                                         source_layout, args, seed, source_method, reuse=True))
                    checkpoint = train(data, out / run_name(preset, name, seed, source), layout, args, seed, method,
                                       pretrained)
                except FloatingPointError as err:  # reported, not averaged in
                    log.warning("%s / %s, training seed %d: %s", preset, name, seed, err)
                    diverged.append(f"{preset} / {name}, training seed {seed}: {str(err).split(';')[0]}")
                    continue
                kept = {} if name == "vgg16-mnpo" and not runs else None  # the first seed that trained
                runs.append(evaluate(checkpoint, data, rows, args, shown, kept))
                trained.append(seed)
                if kept is not None:
                    thresholds = kept.pop("thresholds")
                    method_gallery(out / f"figure-{preset}.png", data / "images", test, shown, kept, thresholds)
            key = (preset, name if source is None else f"{name} from {source}")
            if runs:
                all_results[key], run_seeds[key] = runs, trained
            # rewritten after every (preset, layout): a run cut short keeps the rows it finished
            text = write_results(out, all_results, diverged, args, run_seeds, device,
                                 f"{time.perf_counter() - start:.0f} s")
    print(text)


def write_results(out: Path, all_results: dict, diverged: list[str], args, run_seeds: dict, device: str,
                  took: str) -> str:
    """``OUT/study.md`` and ``OUT/study.json`` for the (preset, layout) pairs finished so far
    (atomic writes); returns the markdown. ``run_seeds``: the training seeds of each pair's runs
    (None for the center baseline, which trains nothing); ``device`` and ``took``: the header's
    machine and time. Runs that diverged are listed under the table and left out of its means."""
    seeds = sorted({seed for value in run_seeds.values() for seed in value or ()})
    transformers = any(name.startswith("deit_") for _, name in all_results)
    deit = (f"DeiT models: AdamW lr {args.transformer_lr}, weight decay 0.05, drop-path 0.1, width "
            f"{args.transformer_width}; " if transformers else "")
    header = (f"device: {device}; "
              f"{args.image_size} px, {args.classes} classes, {args.train_per_class} train / {args.val_per_class} val / "
              f"{args.test_per_class} test per class, {args.epochs} epochs, width {args.width}, data seed {args.seed}, "
              f"training seeds {seeds}; {deit}{_faithfulness_header(args)}{took}")
    summary = {key: summarize(runs) for key, runs in all_results.items()}
    text = f"{header}\n\n{table(summary)}\n"
    if diverged:
        text += "\nDiverged, left out of the means above:\n" + "".join(f"- {d}\n" for d in diverged)
    with atomic_path(out / "study.md") as tmp:
        tmp.write_text(text)
    write_json_atomic(out / "study.json", {"settings": vars(args), "header": header, "diverged": diverged, "results": {
        f"{p}/{l}": {"per_seed": r, "seeds": run_seeds[(p, l)], "summary": summary[(p, l)]}
        for (p, l), r in all_results.items()}})
    return text


def _faithfulness_header(args) -> str:
    metrics = getattr(args, "faithfulness", "none")
    if metrics == "none":
        return ""
    parts = [metrics]
    if "deletion" in metrics or "insertion" in metrics:
        parts.append(f"{args.faithfulness_steps} deletion / insertion steps")
    if "road" in metrics:
        parts.append("ROAD at 10 .. 90 % with noise 0.01")
    return f"faithfulness on test ({'; '.join(parts)}; seed {args.seed}); "


#: settings that must agree between the studies ``--merge`` combines (the data, the training and
#: the faithfulness pass)
MERGE_SETTINGS = ("image_size", "classes", "train_per_class", "val_per_class", "test_per_class", "epochs", "batch",
                  "lr", "clip_grad_norm", "width", "seed", "fp32_maps", "faithfulness", "faithfulness_steps",
                  "normalize", "backbone_from", "transformer_lr", "transformer_width")
#: Settings of one kind of model only, "cnn" or "deit": compared between files that hold that kind
#: (the DeiT models do not use --width; a file of CNN runs written before the --transformer-*
#: options existed has none).
SETTING_KIND = {"width": "cnn", "transformer_lr": "deit", "transformer_width": "deit"}


def merge(paths: list[str], out: Path) -> str:
    """One table from several runs' ``study.json`` (the same settings, other training seeds or
    models): each (preset, model)'s runs pooled over the files, a seed given twice refused."""
    import json
    from argparse import Namespace

    first: tuple[str, dict] | None = None
    first_of: dict[str, tuple[str, dict]] = {}  # the first file holding a CNN / a DeiT model
    all_results: dict[tuple[str, str], list[list[dict]]] = {}
    run_seeds: dict[tuple[str, str], list[int] | None] = {}
    diverged: list[str] = []
    devices: list[str] = []
    fsl_epochs: tuple[str, int] | None = None  # the first FSL run's file and epochs: the others' must agree
    for path in paths:
        try:
            study = json.loads(Path(path).read_text())
            settings, results = study["settings"], study["results"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"{path}: not a study.json written by study.py ({type(err).__name__}: {err})") from None
        if first is None:
            first = (path, settings)
        deit = {name.split("/", 1)[-1] in TRANSFORMER_MODELS for name in results}
        holds = {"cnn": False in deit, "deit": True in deit}
        for kind in ("cnn", "deit"):
            if holds[kind]:
                first_of.setdefault(kind, (path, settings))
        for key in MERGE_SETTINGS:
            against = first
            kind = SETTING_KIND.get(key)
            if kind is not None:  # a setting of one kind of model: compared only between files that hold it
                if not holds[kind]:
                    continue
                against = first_of[kind]
            if settings.get(key) != against[1].get(key):
                raise SystemExit(f"{path}: {key} is {settings.get(key)!r} but {against[0]} has "
                                 f"{against[1].get(key)!r}; only runs of the same settings can be merged")
        devices.append(study["header"].removeprefix("device: ").split(f"; {settings['image_size']} px")[0])
        diverged += study["diverged"]
        for name, entry in results.items():
            key = tuple(name.split("/", 1))
            if key[1].endswith("+fsl"):
                epochs = settings.get("fsl_epochs") or settings["epochs"]
                fsl_epochs = fsl_epochs or (path, epochs)
                if epochs != fsl_epochs[1]:
                    raise SystemExit(f"{path}: FSL trained {epochs} epochs but {fsl_epochs[1]} in {fsl_epochs[0]}; "
                                     "only runs of the same settings can be merged")
            if "seeds" in entry:
                seeds = entry["seeds"]
            elif key[1] == "center":  # a study.json from before seeds were stored
                seeds = None
            else:  # likewise: its runs are the listed seeds, if none diverged
                seeds = [int(x) for x in settings["train_seeds"].split(",")]
                if len(seeds) != len(entry["per_seed"]):
                    raise SystemExit(f"{path}: cannot tell which training seeds {name}'s runs are")
            if seeds is None:  # the center baseline: the same whichever run computed it
                all_results.setdefault(key, entry["per_seed"])
                run_seeds[key] = None
                continue
            twice = sorted(set(seeds) & set(run_seeds.get(key) or ()))
            if twice:
                raise SystemExit(f"{path}: {name}, training seed(s) {twice} are already in an earlier file")
            all_results.setdefault(key, []).extend(entry["per_seed"])
            run_seeds[key] = [*(run_seeds.get(key) or ()), *seeds]
    seeds = sorted({seed for value in run_seeds.values() for seed in value or ()})
    args = Namespace(**{**first[1], "merged": list(paths), "train_seeds": ",".join(map(str, seeds)), "models": None,
                        "presets": ",".join(dict.fromkeys(p for p, _ in all_results))})
    out.mkdir(parents=True, exist_ok=True)
    return write_results(out, all_results, diverged, args, run_seeds, " + ".join(dict.fromkeys(devices)),
                         f"merged from {len(paths)} study.json files")


if __name__ == "__main__":
    main()
