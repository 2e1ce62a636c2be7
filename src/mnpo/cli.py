"""The `mnpo` command line: one subcommand per job.

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in
``_build_parser``; imports of heavy modules happen inside the command so that
``mnpo --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mnpo import __version__
from mnpo.engine.config import PRECISIONS  # light (no torch): the precision choices of the parser
from mnpo.engine.localize import (  # light too: the map methods
    METHOD_CHOICES,
    add_model_args,
    add_normalize_args,
    normalize_options,
)

log = logging.getLogger("mnpo")


def _cmd_synth(args: argparse.Namespace) -> int:
    from mnpo.data.synthetic import PRESETS, write_synthetic_dataset

    if args.preset not in PRESETS:
        raise SystemExit(f"mnpo synth: unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    summary = write_synthetic_dataset(
        out=Path(args.out),
        preset=args.preset,
        seed=args.seed,
        image_size=args.image_size,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
    )
    for split, count in summary.items():
        log.info("%s: %d images", split, count)
    print(f"wrote synthetic '{args.preset}' set to {args.out}: "
          + ", ".join(f"{split} {n}" for split, n in summary.items()))
    return 0


def _cmd_make_metadata(args: argparse.Namespace) -> int:
    from mnpo.data import make_metadata as mm

    sources = [flag for flag in ("boxes", "voc", "coco", "masks") if getattr(args, flag)]
    if len(sources) > 1:
        raise ValueError(f"give one source of boxes or masks, not {', '.join('--' + s for s in sources)}")
    images = mm.scan_image_tree(args.root)
    ids = [im.image_id for im in images]
    if args.boxes:
        boxes = mm.read_box_csv(args.boxes)
    elif args.voc:
        boxes = mm.read_voc_boxes(args.voc, ids)
    elif args.coco:
        boxes = mm.read_coco_boxes(args.coco, ids)
    else:
        boxes = {}
    names = mm.read_class_names(args.classes) if args.classes else None
    splits = mm.make_metadata(args.root, args.out, boxes=boxes, masks=args.masks, class_names=names,
                              val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                              workers=args.workers, images=images)
    classes = len(names) if names else len({im.class_name for im in images})
    print(f"wrote {args.out}: {classes} classes; " + ", ".join(
        f"{split} {len(m)} images"
        + {"box": f" ({m.num_boxes} boxes)", "mask": f" ({m.num_masks} masks)"}.get(m.kind, "")
        for split, m in splits.items()))
    masks = f" data.mask_root={args.masks} eval.metric=pxap" if args.masks else ""
    print(f"train with: mnpo train --config CONFIG data.root={args.root} data.metadata={args.out}{masks}")
    return 0


def _cmd_evaluate_maps(args: argparse.Namespace) -> int:
    from mnpo.engine.evaluate_maps import evaluate_map_folders
    from mnpo.io import write_json_atomic

    report = evaluate_map_folders(
        args.maps, args.metadata, val_maps=args.val_maps, val_metadata=args.val_metadata,
        mask_root=args.mask_root, cam_curve_interval=args.cam_curve_interval,
        threshold_grid=args.threshold_grid, logits=args.logits,
        val_logits=args.val_logits, workers=args.workers, progress=not args.quiet, center=args.center,
        data=args.data, results=args.results, report_html=args.report, label=args.label,
        gallery_size=args.gallery_size, faithfulness=_faithfulness_settings(args),
        checkpoint=args.checkpoint, model_spec=args.model, weights=args.weights, num_classes=args.num_classes,
        input_size=args.input_size, device=args.device, batch_size=args.batch_size,
        **normalize_options(args),
    )
    print(report.table())
    if report.calibrated is None and report.info["kind"] == "box":
        print("(oracle only: thresholds tuned on the evaluated split; give --val-maps/--val-metadata "
              "for the calibrated protocol)")
    if args.json:
        write_json_atomic(args.json, report.to_json())
        log.info("wrote %s", args.json)
    return 0


def _cmd_import_checkpoint(args: argparse.Namespace) -> int:
    if args.source in ("tscam", "sat", "scm"):
        from mnpo.models.transformer_checkpoint import NETWORKS
        from mnpo.models.transformer_checkpoint import import_checkpoint as import_transformer

        if args.large_feature_map is not None or args.acol_threshold is not None:
            raise ValueError("--large-feature-map and --acol-threshold are for --from wsolevaluation")
        summary = import_transformer(args.src, args.dst, args.source, trust_pickle=args.trust_pickle)
        dropped = f" (SCM's {summary['dropped']} training-only tensors left out)" if summary["dropped"] else ""
        print(f"imported {args.src} -> {args.dst}: the {NETWORKS[args.source]} authors' {summary['layout']}{dropped}, "
              f"{summary['num_classes']} "
              f"classes, {summary['tensors']} tensors, {summary['parameters'] / 1e6:.2f} M parameters")
        return 0
    if args.source == "bgc":
        from mnpo.models.bgc_checkpoint import import_checkpoint as import_bgc

        if args.acol_threshold is not None:
            raise ValueError("--acol-threshold is for --from wsolevaluation")
        summary = import_bgc(args.src, args.dst, large_feature_map=args.large_feature_map,
                             trust_pickle=args.trust_pickle)
        print(f"imported {args.src} -> {args.dst}: the BGC authors' {summary['layout']}"
              + (", large feature map" if summary["large_feature_map"] else "")
              + f", {summary['num_classes']} classes, {summary['tensors']} tensors, "
              f"{summary['parameters'] / 1e6:.2f} M parameters")
        return 0
    if args.source == "bas":
        from mnpo.models.bas_checkpoint import import_checkpoint as import_bas

        if args.large_feature_map is not None or args.acol_threshold is not None:
            raise ValueError("--large-feature-map and --acol-threshold are for --from wsolevaluation")
        summary = import_bas(args.src, args.dst, trust_pickle=args.trust_pickle)
        copies = f" ({summary['dropped_copies']} tensors of its frozen copies left out)" if summary["dropped_copies"] else ""
        print(f"imported {args.src} -> {args.dst}: the BAS authors' {summary['layout']}, {summary['num_classes']} "
              f"classes, {summary['tensors']} tensors{copies}, {summary['parameters'] / 1e6:.2f} M parameters")
        return 0
    if args.source == "release":
        from mnpo.models.release import import_released_checkpoint

        if args.large_feature_map is not None or args.acol_threshold is not None:
            raise ValueError("--large-feature-map and --acol-threshold are for --from wsolevaluation")
        summary = import_released_checkpoint(args.src, args.dst, trust_pickle=args.trust_pickle)
        print(f"imported {args.src} -> {args.dst}: released two-branch VGG16 layout, "
              f"{summary['num_classes']} classes, {summary['tensors']} tensors, "
              f"{summary['parameters'] / 1e6:.2f} M parameters")
        return 0
    from mnpo.models.wsolevaluation import import_checkpoint

    summary = import_checkpoint(args.src, args.dst, large_feature_map=args.large_feature_map,
                                acol_threshold=args.acol_threshold, trust_pickle=args.trust_pickle)
    print(f"imported {args.src} -> {args.dst}: wsolevaluation's {summary['layout']}"
          + (" (ADL)" if summary["variant"] == "adl" else "")
          + (", large feature map" if summary["large_feature_map"] else "")
          + f", {summary['num_classes']} classes, {summary['tensors']} tensors, "
          f"{summary['parameters'] / 1e6:.2f} M parameters")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mnpo.engine.config import load_config
    from mnpo.engine.train import Trainer

    overrides = list(args.overrides)
    if args.pretrained is not None:
        overrides.append(f"model.pretrained={args.pretrained}")
    cfg = load_config(args.config, overrides)
    result = Trainer(cfg, resume=args.resume, progress=not args.quiet).fit()
    if result and _is_main_process():
        print(f"done: {cfg.runtime.out} (last epoch {result['epoch']}, val {cfg.eval.metric} "
              f"{result.get('val_' + cfg.eval.metric, float('nan')):.2f})")
    return 0


def _is_main_process() -> bool:
    """True unless this is a torchrun worker other than rank 0."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _map_options(args: argparse.Namespace) -> dict:
    options = {}
    for key in ("h_mode", "a", "b", "target_layer", "fusion", "resize", "loss_gradient", "chunk_size", "top_k"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    return {**options, **normalize_options(args)}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mnpo.engine.evaluate import evaluate_checkpoint
    from mnpo.io import write_json_atomic

    if args.paper_protocol and args.checkpoint is None:
        raise ValueError("--paper-protocol scores an mnpo checkpoint (<backbone>-bas, deit_*-tscam or deit_*-sat): "
                         "give --checkpoint")
    report = evaluate_checkpoint(
        args.checkpoint, args.data, args.metadata, val_metadata=args.val_metadata, mask_root=args.mask_root,
        method=args.method, map_options=_map_options(args), cam_curve_interval=args.cam_curve_interval,
        threshold_grid=args.threshold_grid,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
        ten_crop=not args.no_ten_crop, save_maps=args.save_maps, save_overlays=args.save_overlays,
        input_size=args.input_size, map_precision=args.map_precision, progress=not args.quiet,
        state_dir=args.state_dir, results=args.results, report_html=args.report, label=args.label,
        gallery_size=args.gallery_size, skip_unreadable=args.skip_unreadable,
        model_spec=args.model, weights=args.weights, num_classes=args.num_classes,
        faithfulness=_faithfulness_settings(args), decode=args.decode,
    )
    if not _is_main_process():
        return 0  # under torchrun, rank 0 reports for all
    cls = report.info["classification"]
    unreadable = report.info["unreadable_images"] + report.info.get("val_unreadable_images", [])
    for item in unreadable:
        log.warning("counted as a miss: %s", item["reason"])
    print(f"method {args.method}, {report.info['num_images']} images"
          + (f" ({len(report.info['unreadable_images'])} unreadable, counted as misses)"
             if report.info["unreadable_images"] else ""))
    if cls is None:
        print(f"classification: {report.info['classification_view']}")
    else:
        print(f"classification ({report.info['classification_view']}): top-1 {cls['top1_cls']:.2f}, "
              f"top-5 {cls['top5_cls']:.2f}")
    print(report.table())
    out = report.to_json()
    if args.paper_protocol and not args.paper_protocol.startswith("bas-"):
        from mnpo.engine.transformer_protocols import run_paper_protocol as run_transformer_protocol

        protocol, data_set = args.paper_protocol.split("-")
        paper = run_transformer_protocol(protocol, args.checkpoint, args.data, args.metadata, data_set,
                                         threshold=args.paper_threshold, batch_size=args.batch_size,
                                         device=args.device, mask_root=args.mask_root)
        how = {"tscam": "their cams_deit.py; resize 224, threshold {t:g} of the maximum, the largest contour, "
                        "the single view's class",
               "sat": "their evaluator.py; resize 256, crop 224, threshold {t:g}, the largest component, "
                      "ten-crop classes"}[protocol].format(t=paper.threshold)
        print(f"\n{ {'tscam': 'TS-CAM', 'sat': 'SAT'}[protocol] }'s own protocol ({data_set}: {how}; image means; "
              "not comparable with the MaxBoxAccV2 above):")
        print(f"  GT-known Loc {paper.gt_known_loc:.2f}, Top-1 Loc {paper.top1_loc:.2f}, "
              f"Top-5 Loc {paper.top5_loc:.2f}, Top-1 Cls {paper.top1_cls:.2f}")
        out["paper_protocol"] = {"name": args.paper_protocol, **paper.to_json()}
    elif args.paper_protocol:
        from mnpo.engine.bas_protocol import run_paper_protocol

        data_set = args.paper_protocol.removeprefix("bas-")
        paper = run_paper_protocol(args.checkpoint, args.data, args.metadata, data_set,
                                   threshold=args.paper_threshold, top_k=args.top_k, batch_size=args.batch_size,
                                   device=args.device, mask_root=args.mask_root)
        print(f"\nBAS's own protocol ({data_set}: their BAS_inference.py; resize 256, crop 224, threshold "
              f"{paper.threshold:g}, top-k {paper.top_k or 'the true class'}, largest component, per-class means; "
              "not comparable with the MaxBoxAccV2 above):")
        print(f"  GT-known Loc {paper.gt_known_loc:.2f}, Top-1 Loc {paper.top1_loc:.2f}, "
              f"Top-5 Loc {paper.top5_loc:.2f} (over images: {paper.gt_known_loc_images:.2f}, "
              f"{paper.top1_loc_images:.2f})")
        out["paper_protocol"] = {"name": args.paper_protocol, **paper.to_json()}
    if args.json:
        write_json_atomic(args.json, out)
        log.info("wrote %s", args.json)
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from mnpo.engine.localize import model_from_args

    model, _, name = model_from_args(args)
    size = args.input_size
    if getattr(model, "layout", None) is not None:  # one of mnpo's networks: its feature names
        import torch

        with torch.inference_mode():
            out = model(torch.zeros(1, 3, size, size), return_features=True, taps=tuple(model.backbone.taps))
        print(f"{name}: features for a {size}x{size} input (target layers by these names)")
        print(f"{'feature':<24} {'output':<22} {'stride':>6}")
        for feature in model.feature_names:
            shape = tuple(out.features[feature].shape) if feature in out.features else None
            stride = f"{size / shape[-2]:g}" if shape else "-"
            print(f"{feature:<24} {str(shape or '-'):<22} {stride:>6}")
        return 0
    from mnpo.models.hooked import layer_table

    rows = layer_table(model, size)
    print(f"{name}: modules whose output is a map or token grid for a {size}x{size} input")
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'output':<20} {'kind':<13} {'grid':>7} {'stride':>6} {'channels':>8}  note")
    for r in rows:
        note = ("auto" if r["auto"] else "") + ("" if r["reached"] else "no gradient reaches its grid") + (
            f"runs {r['calls']} times" if r["calls"] > 1 else "")
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        print(f"{r['name']:<{width}}  {str(r['shape']):<20} {r['kind']:<13} {grid:>7} {r['stride']:>6g} "
              f"{r['channels']:>8}  {note}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mnpo.engine.report import report_from_files

    out = report_from_files(args.results, args.out, gallery_rows=args.gallery_rows)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {len(args.results)} result(s)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mnpo.engine.demo import DemoSettings, print_summary, run_demo

    settings = DemoSettings(epochs=args.epochs, image_size=args.image_size, seed=args.seed)
    summary = run_demo(Path(args.out), settings, progress=not args.quiet)
    print_summary(summary, Path(args.out))
    return 0


def _add_output_args(parser: argparse.ArgumentParser, default_label: str) -> None:
    """What an evaluation writes besides its printed table, shared by evaluate and evaluate-maps."""
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--results", help="also write the per-image results (.npz, read by mnpo report) to this file")
    parser.add_argument("--report", help="also write the HTML report of this result to this file")
    parser.add_argument("--label", help=f"the result's name in reports (default: {default_label})")
    parser.add_argument("--gallery-size", type=int, default=128,
                        help="images sampled for the report's gallery (default 128)")


def _add_faithfulness_args(parser: argparse.ArgumentParser) -> None:
    """The faithfulness pass, shared by evaluate and evaluate-maps."""
    parser.add_argument("--faithfulness", metavar="METRICS",
                        help="also score the maps' faithfulness to the model: a comma list of avgdrop, deletion, "
                             "insertion, road, pointing (boxes or masks needed), or all; on a split without "
                             "localization.txt these are the only metrics")
    parser.add_argument("--faithfulness-steps", type=int, default=112,
                        help="deletion / insertion steps (default 112: 448 pixels a step at 224, as RISE)")
    parser.add_argument("--road-percentiles", default="10,20,30,40,50,60,70,80,90",
                        help="ROAD's percentiles of removed pixels (default 10,...,90)")
    parser.add_argument("--road-noise", type=float, default=0.01,
                        help="ROAD imputation noise, on the model input's scale (default 0.01)")
    parser.add_argument("--faithfulness-seed", type=int, default=0,
                        help="seed of the random-map baseline and of ROAD's noise (default 0)")
    parser.add_argument("--no-faithfulness-baselines", action="store_true",
                        help="score only the maps, not the random-map and center-map baselines (a third of the time)")


def _faithfulness_settings(args: argparse.Namespace):
    """``FaithfulnessSettings`` from the command line (None without ``--faithfulness``)."""
    if not args.faithfulness:
        return None
    from mnpo.engine.faithfulness import BASELINES, FaithfulnessSettings

    try:
        percentiles = tuple(int(p) for p in args.road_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--road-percentiles must be integers separated by commas, got {args.road_percentiles!r}")
    return FaithfulnessSettings(
        metrics=args.faithfulness, steps=args.faithfulness_steps, road_percentiles=percentiles,
        road_noise=args.road_noise, seed=args.faithfulness_seed,
        chunk_size=getattr(args, "chunk_size", None) or 16,
        baselines=() if args.no_faithfulness_baselines else BASELINES)


def _add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """The score-map threshold grid, shared by evaluate and evaluate-maps."""
    parser.add_argument("--cam-curve-interval", type=float, default=0.01,
                        help="score-map threshold step (default 0.01: thresholds 0, 0.01, ..., 0.99)")
    parser.add_argument("--threshold-grid", choices=("full", "paper"), default="full",
                        help="'full': 0, interval, ..., < 1 (wsolevaluation, default); 'paper': 0.05, 0.06, ..., "
                        "0.34, the released MNPO code's sweep (its oracle numbers are the paper's)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnpo",
        description="MNPO / MNPOs weakly supervised object localization toolkit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"mnpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser(
        "synth",
        help="write a synthetic WSOL data set in the wsolevaluation layout",
        description="Write a deterministic synthetic WSOL data set (images, masks and "
        "metadata for train/val/test) in the wsolevaluation layout.",
    )
    synth.add_argument("--out", required=True, help="output folder (created)")
    synth.add_argument("--preset", default="parts", help="'shapes' (easy) or 'parts' (class given by a small mark)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    synth.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    synth.add_argument("--train-per-class", type=int, default=40, help="training images per class (default 40)")
    synth.add_argument("--val-per-class", type=int, default=5, help="val images per class, fully supervised (default 5)")
    synth.add_argument("--test-per-class", type=int, default=20, help="test images per class (default 20)")
    synth.set_defaults(func=_cmd_synth)

    mk = sub.add_parser(
        "make-metadata",
        help="metadata for your own data: class folders plus boxes or masks -> train/val/test split folders",
        description="Scan ROOT/<class>/... (split at random per class) or ROOT/{train,val,test}/<class>/... for "
        "images, read boxes from a CSV (path,x0,y0,x1,y1, inclusive pixels), Pascal VOC XML or COCO JSON, or masks "
        "from a folder mirroring ROOT, check them against the image sizes and write OUT/{train,val,test}/ in the "
        "wsolevaluation layout plus OUT/class_names.txt. Every val and test image needs a box or a mask.",
    )
    mk.add_argument("root", help="image root: class folders, or train/val/test folders of class folders")
    mk.add_argument("out", help="metadata folder to write (train/, val/, test/, class_names.txt)")
    mk.add_argument("--boxes", metavar="CSV", help="boxes as path,x0,y0,x1,y1 lines (paths relative to ROOT)")
    mk.add_argument("--voc", metavar="DIR", help="Pascal VOC XML folder (<path>.xml or <name>.xml per image)")
    mk.add_argument("--coco", metavar="JSON", help="COCO annotation file (bbox [x, y, w, h])")
    mk.add_argument("--masks", metavar="DIR", help="mask folder for PxAP: the mask of ROOT/<path>.<ext> is "
                    "DIR/<path>.png (non-zero: object), an optional ignore mask DIR/<path>.ignore.png; "
                    "DIR is then the mask root of training and evaluation")
    mk.add_argument("--classes", metavar="FILE", help="class order, one name per line (default: sorted folder names)")
    mk.add_argument("--val-fraction", type=float, default=0.1, help="per class, for ROOT/<class>/ (default 0.1)")
    mk.add_argument("--test-fraction", type=float, default=0.1, help="per class, for ROOT/<class>/ (default 0.1)")
    mk.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    mk.add_argument("--workers", type=int, default=8, help="threads reading image sizes (default 8)")
    mk.set_defaults(func=_cmd_make_metadata)

    ev = sub.add_parser(
        "evaluate-maps",
        help="evaluate saved score maps (any method) against a split's metadata",
        description="Evaluate one 224x224 .npy score map per image, DIR/<image_id>.npy, against a "
        "split folder holding image_ids.txt, class_labels.txt, image_sizes.txt and localization.txt. "
        "Prints the oracle protocol (best threshold on the split itself) and, with --val-maps and "
        "--val-metadata, the calibrated protocol (thresholds chosen on val).",
    )
    ev.add_argument("--maps", help="folder of <image_id>.npy score maps in [0, 1]")
    ev.add_argument("--center", action="store_true",
                    help="score the center baseline (a centred Gaussian for every image, no network) "
                         "instead of --maps; with --val-metadata under both protocols")
    ev.add_argument("--metadata", required=True, help="metadata folder of the evaluated split")
    ev.add_argument("--val-maps", help="score maps of the val split (for the calibrated protocol)")
    ev.add_argument("--val-metadata", help="metadata folder of the val split")
    ev.add_argument("--mask-root", help="folder the mask paths of a mask split are relative to (PxAP)")
    ev.add_argument("--logits", help=".npy (N, C) class scores, rows in image_ids.txt order (Top-1/5 Loc)")
    ev.add_argument("--val-logits", help=".npy (N, C) class scores of the val split")
    add_normalize_args(ev, default="the maps as saved (max cannot undo a saved min-max)")
    _add_threshold_args(ev)
    ev.add_argument("--workers", type=int, default=None, help="threads (default: available cores, at most 8)")
    _add_output_args(ev, "center, or the maps folder's name")
    ev.add_argument("--data", help="image root (needed by --results and --report for their gallery, and by "
                                   "--faithfulness)")
    _add_faithfulness_args(ev)
    ev.add_argument("--checkpoint", help="(--faithfulness) the mnpo checkpoint whose maps these are")
    ev.add_argument("--model", metavar="SPEC", help="(--faithfulness) or any classifier: torchvision:NAME, "
                                                    "timm:NAME, module:pkg.factory (as evaluate --model)")
    ev.add_argument("--weights", help="(--model) a state dict file")
    ev.add_argument("--num-classes", type=int, help="(--model) its class count when not ImageNet's")
    ev.add_argument("--input-size", type=int, default=224, help="(--faithfulness) the model's input side (224)")
    ev.add_argument("--device", default="auto", help="(--faithfulness) auto, cpu, cuda or cuda:N")
    ev.add_argument("--batch-size", type=int, default=64, help="(--faithfulness) images per batch (64)")
    ev.add_argument("--chunk-size", dest="chunk_size", type=int,
                    help="(--faithfulness) perturbed copies per forward pass (default 16)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_evaluate_maps)

    imp = sub.add_parser(
        "import-checkpoint",
        help="convert the MNPO authors' released checkpoint, or one wsolevaluation or the BAS code trained, into an "
             "mnpo checkpoint",
        description="Convert a checkpoint of the authors' release (a torch.save dict whose "
        "'state_dict' names the VGG16 convs conv1..conv13, the head conv6, fc and branch1_layer), or with "
        "--from wsolevaluation one of clovaai/wsolevaluation's (its main.py's {last,best}_checkpoint.pth.tar), "
        "or with --from bas / bgc / tscam / sat / scm a state dict of those methods' authors' code, "
        "into an mnpo checkpoint holding the layout, the class count (read from the file) and the "
        "weights. Every tensor must map; otherwise nothing is written.",
    )
    imp.add_argument("src", help="the .pth / .pth.tar file")
    imp.add_argument("dst", help="the mnpo checkpoint to write (atomically)")
    imp.add_argument("--from", dest="source", choices=("release", "wsolevaluation", "bas", "bgc", "tscam", "sat", "scm"),
                     default="release",
                     help="'release': the MNPO authors' release (default); 'wsolevaluation': a checkpoint that "
                          "clovaai/wsolevaluation's main.py trained (CAM, HaS, CutMix, ADL, ACoL or SPG on VGG16, "
                          "ResNet50 or InceptionV3; the network is read from the names); 'bas': a state dict the "
                          "BAS authors' train.py saved (VGG16, ResNet50 or InceptionV3, read from the names); 'bgc': a "
                          "checkpoint of the BGC authors' trainer.py (VGG16 or ResNet50); 'tscam': a checkpoint of the "
                          "TS-CAM authors' train_cam.py (DeiT tiny, small or base, read from the widths); 'sat': one of the "
                          "SAT authors' train.py (the same DeiTs); 'scm': one of the SCM authors' (their TS-CAM network, "
                          "the training-only calibration layers left out)")
    imp.add_argument("--large-feature-map", action="store_true", default=None,
                     help="(wsolevaluation, bgc) it was trained with the large feature map (seen by itself in "
                          "VGG16 files; bgc's ResNet50 default: on, as the authors' recipe)")
    imp.add_argument("--no-large-feature-map", dest="large_feature_map", action="store_false",
                     help="(bgc) a ResNet50 trained without the large feature map")
    imp.add_argument("--acol-threshold", type=float, default=None,
                     help="(wsolevaluation, ACoL) its --acol_threshold (default 0.7)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="load SRC with full pickle (runs code stored in the file); only for files you trust "
                     "that weights_only loading refuses")
    imp.set_defaults(func=_cmd_import_checkpoint)

    tr = sub.add_parser(
        "train",
        help="train a network (MNPO, CAM, HaS, CutMix, ADL, ACoL, SPG or the FSL baseline) from a YAML config",
        description="Train from a YAML config (see configs/). KEY=VALUE overrides replace config "
        "entries by dotted key, e.g. optim.lr=0.001 runtime.out=runs/x. Writes config.yaml, "
        "metrics.csv, tensorboard/, last.pt (every epoch, resumable) and best.pt into runtime.out. "
        "Under torchrun (python -m torch.distributed.run --nproc_per_node=N -m mnpo train ...) "
        "it trains data-parallel.",
    )
    tr.add_argument("--config", required=True, help="YAML config file")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides by dotted key")
    tr.add_argument("--resume", action="store_true", help="continue from runtime.out/last.pt")
    tr.add_argument("--pretrained", metavar="SOURCE",
                    help="backbone weights: 'imagenet' (torchvision's weights API, downloads once) or a local "
                    ".pth state dict for machines without internet; same as model.pretrained=SOURCE")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    ev2 = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint: classification, maps and every localization metric",
        description="Evaluate a checkpoint on a split: ten-crop classification, the chosen method's "
        "maps of the ground-truth class, MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 / Top-5 Loc (box "
        "splits) or PxAP (mask splits), under the oracle protocol and, with --val-metadata, the "
        "calibrated one.",
    )
    add_model_args(ev2)
    ev2.add_argument("--data", required=True, help="image root the image ids are relative to")
    ev2.add_argument("--metadata", required=True, help="metadata folder of the evaluated split")
    ev2.add_argument("--val-metadata", help="metadata folder of val (thresholds for the calibrated protocol)")
    ev2.add_argument("--mask-root", help="folder the mask paths of a mask split are relative to")
    ev2.add_argument("--method", default="mnpos", choices=METHOD_CHOICES,
                     help="map method (default mnpos): cam, mnpo, mnpos, dgl, or the CAM family "
                     "(gradcam, gradcampp, xgradcam, layercam, hirescam, scorecam, ablationcam, eigencam)")
    ev2.add_argument("--h-mode", dest="h_mode", choices=("scale", "step"), help="weight post-processing H")
    ev2.add_argument("--a", type=float, help="H factor for positive weights (method default)")
    ev2.add_argument("--b", type=float, help="H factor for the other weights (method default)")
    ev2.add_argument("--target-layer", dest="target_layer",
                     help="layer of the gradient methods and the CAM family (e.g. conv5_2, head)")
    ev2.add_argument("--chunk-size", dest="chunk_size", type=int,
                     help="masked, ablated or perturbed copies per forward pass of scorecam / ablationcam and of "
                          "the faithfulness metrics (default 16)")
    ev2.add_argument("--fusion", choices=("max", "mean"), help="branch fusion of mnpo (default max)")
    ev2.add_argument("--resize", choices=("bicubic", "bilinear"), help="map resize (default bicubic)")
    ev2.add_argument("--loss-gradient", dest="loss_gradient", choices=("released", "exact"),
                     help="MNPOs loss gradient (default released)")
    ev2.add_argument("--top-k", dest="top_k", type=int, metavar="K",
                     help="cam on a <backbone>-bas network: the mean of the generator's maps of the K best-scored "
                          "classes (BAS's CUB protocol: 200, 80 for VGG16) instead of the true class's")
    ev2.add_argument("--paper-protocol", choices=("bas-cub", "bas-ilsvrc", "tscam-cub", "tscam-ilsvrc", "sat-cub",
                                                  "sat-ilsvrc"),
                     help="also a paper's own protocol, printed and saved apart from the calibrated numbers: BAS's "
                          "(resize 256 + crop 224, a fixed threshold, the largest connected component, per-class "
                          "means), TS-CAM's (resize 224, a threshold relative to the maximum, the largest contour) "
                          "or SAT's (resize 256 + crop 224, a fixed threshold, the largest component, ten-crop "
                          "classes)")
    ev2.add_argument("--paper-threshold", type=float, metavar="T",
                     help="(--paper-protocol) its fixed threshold (default: their script's for the data set and "
                          "backbone; --top-k likewise)")
    add_normalize_args(ev2)
    _add_threshold_args(ev2)
    ev2.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    ev2.add_argument("--workers", type=int, default=4, help="data loader processes (default 4)")
    ev2.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ev2.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="of the ten-crop classification; auto: bf16 on a GPU that has it, else fp32 "
                          "(fp32 is strict; tf32: fp32 on TF32 tensor cores, CUDA only)")
    ev2.add_argument("--map-precision", default="fp32", choices=PRECISIONS[1:],
                     help="of the maps (default fp32, strict: bf16 moves normalized maps by 1e-2 to 4e-2)")
    ev2.add_argument("--no-ten-crop", action="store_true", help="classify from the 224x224 view instead")
    ev2.add_argument("--input-size", type=int, default=224,
                     help="network input side (default 224, the protocol; ten crops from 256/224 of it)")
    ev2.add_argument("--save-maps", help="write each 224x224 map as DIR/<image_id>.npy")
    ev2.add_argument("--save-overlays", help="write DIR/<image_id>.png: map, predicted and true boxes")
    _add_output_args(ev2, "the method")
    _add_faithfulness_args(ev2)
    ev2.add_argument("--skip-unreadable", action="store_true",
                     help="count an unreadable image as a miss for every metric (IoU 0, wrong class; PxAP: a map "
                          "of zeros) and list it, instead of stopping with an error that names every such file")
    ev2.add_argument("--decode", choices=("host", "device"), default="host",
                     help="host (default): PIL decodes and resizes in the workers, wsolevaluation's pixels; device: "
                          "the workers only read the files, JPEGs are decoded (nvJPEG on a GPU) and every image "
                          "resized on the evaluation device, within one level of those pixels")
    ev2.add_argument("--state-dir", metavar="DIR",
                     help="keep the progress in DIR (a JSON per split, saved every minute): the same command, "
                          "run again after an interruption, continues where it stopped")
    ev2.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev2.set_defaults(func=_cmd_evaluate)

    from mnpo.engine.localize import add_localize_parser

    add_localize_parser(sub)

    lay = sub.add_parser(
        "layers",
        help="list the layers a map method can target, with their output shape and stride",
        description="For --model SPEC: every module whose output is a spatial map (B, C, h, w), a token "
        "sequence (B, N, C) or a channels-last map (B, h, w, C) for a square input, in the order the modules "
        "finish, with its grid, stride and channels, whether the top score's gradient reaches it, and the one "
        "--target-layer auto picks. For --checkpoint: the network's feature names.",
    )
    add_model_args(lay)
    lay.add_argument("--input-size", type=int, default=224, help="input side in pixels (default 224)")
    lay.set_defaults(func=_cmd_layers)

    rep = sub.add_parser(
        "report",
        help="an HTML page of curves, per-class accuracy and galleries from evaluation results",
        description="Build one self-contained HTML file (opens offline) from results files written by "
        "`mnpo evaluate --results`, one per method or checkpoint, all of the same split: a summary "
        "table under both protocols, box accuracy against the threshold (or the pixel PR curve), "
        "per-class accuracy, the per-image IoU distribution and galleries of the best, worst and most "
        "disputed images.",
    )
    rep.add_argument("results", nargs="+", help="results files (.npz from mnpo evaluate --results)")
    rep.add_argument("--out", required=True, help="the HTML file to write")
    rep.add_argument("--gallery-rows", type=int, default=6, help="images per gallery section (default 6)")
    rep.set_defaults(func=_cmd_report)

    demo = sub.add_parser(
        "demo",
        help="synthetic data, CPU training, CAM vs MNPO vs MNPOs, a report (a few minutes)",
        description="Generate the synthetic 'parts' set, train a reduced-width MNPO on the CPU, "
        "evaluate CAM, MNPO and MNPOs under both protocols and write report.md, report.json and "
        "gallery.png into --out.",
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    demo.add_argument("--image-size", type=int, default=64, help="synthetic image side (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the run (default 0)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as err:
        # Bad input: say what and where, without a traceback (-v shows one).
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mnpo {args.command}: error: {message}", file=sys.stderr)
        return 2
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """End a torchrun run cleanly (:func:`mnpo.engine.runtime.shutdown_distributed`). Commands
    that never imported torch.distributed have no group to leave and stay torch-free."""
    if "torch.distributed" in sys.modules:
        from mnpo.engine.runtime import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
