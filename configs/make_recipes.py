"""Write the wsolevaluation recipes: ``configs/<data>-<backbone>-<method>.yaml``.

One recipe per data set (CUB, ILSVRC, OpenImages), backbone (VGG16, ResNet50, InceptionV3)
and method (``cam``, ``has``, ``cutmix``, ``adl``, ``acol``, ``spg``, and ``fsl``, the few-shot fully
supervised baseline),
from wsolevaluation's ``config.py`` defaults and training recipe (``../shared/docs/
wsol-methods.md`` sections 2.6 and 3). Its per-set tuned values are in a spreadsheet that is not
available offline, so every value that is not one of those defaults is ours and says so in the
file's header. Run from the repository root after changing this file:

    python configs/make_recipes.py

``tests/engine/test_config.py`` checks that the files on disk are what this writes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

DATA = {
    # name: (title, data section, selection metric, val images per class)
    "cub": ("CUB-200-2011 (200 classes, boxes)",
            {"root": "/data/CUB_200_2011/images", "metadata": "metadata/CUB", "val_per_class": 5, "workers": 8},
            "max_box_acc_v2"),
    "ilsvrc": ("ILSVRC 2012 (1000 classes, boxes)",
               {"root": "/data/ILSVRC2012", "metadata": "metadata/ILSVRC", "val_per_class": 10, "workers": 16},
               "max_box_acc_v2"),
    "openimages": ("OpenImages30k (100 classes, masks)",
                   {"root": "/data/OpenImages", "metadata": "metadata/OpenImages", "mask_root": "/data/OpenImages",
                    "val_per_class": 25, "workers": 8},
                   "pxap"),
}
BACKBONES = {"vgg16": "VGG16", "resnet50": "ResNet50", "inception_v3": "InceptionV3"}
METHODS = {
    "cam": ({"name": "plain"}, "CAM: cross-entropy on the plain CAM network"),
    "has": ({"name": "has", "has_grid_size": 4, "has_drop_rate": 0.5},
            "HaS: cells of 4 px hidden with probability 0.5 (wsolevaluation's defaults)"),
    "cutmix": ({"name": "cutmix", "cutmix_beta": 1.0, "cutmix_prob": 1.0},
               "CutMix: beta 1, probability 1 (wsolevaluation's defaults)"),
    "adl": ({"name": "adl", "adl_drop_rate": 0.75, "adl_threshold": 0.9},
            "ADL: drop rate 0.75, threshold 0.9 (wsolevaluation's defaults), three layers per backbone"),
    "acol": ({"name": "acol", "acol_threshold": 0.7},
             "ACoL: two classifiers, B on the input erased where A's map reaches 0.7 (wsolevaluation's default)"),
    "spg": ({"name": "spg", "spg_thresholds": [0.7, 0.01, 0.5, 0.05, 0.7, 0.1]},
            "SPG: side branches trained on ternary masks, thresholds 0.7/0.01, 0.5/0.05, 0.7/0.1 "
            "(wsolevaluation's defaults)"),
    "fsl": ({"name": "fsl", "fsl_holdout_per_class": 1},
            "FSL: the few-shot fully supervised baseline, a per-pixel foreground head trained on val's "
            "annotations, one image per class held out to choose the epoch and the threshold (ours)"),
}

HEADER = """# {title}: {backbone} {method_title}.
# Written by configs/make_recipes.py; edit that file, not this one.
# wsolevaluation's config.py defaults (spec wsol-methods.md 2.6, 3): SGD Nesterov, momentum 0.9,
# weight decay 1e-4, lr 0.01, new layers at 10x, batch 64, 40 epochs, lr x0.1 before epoch 30
# (the first period one epoch short: milestone 29), resize 256 + random crop 224 + flip.
# Ours: the data paths and workers, val images per class ({val} here, as wsolevaluation's
# split holds them), the checkpoint choice on val (wsolevaluation reports its last epoch:
# evaluate last.pt to follow it) and eval.method cam. 14x14 maps (large_feature_map off, the
# default; model.large_feature_map=true gives 28x28).{fsl}
"""
FSL_NOTE = """
# FSL trains on val minus the held-out images and never sees the train split; evaluate it with
# --val-metadata RUN/fsl-holdout (the held-out images) for the calibrated protocol."""


def layout(backbone: str, method: str) -> str:
    """The CAM network of a backbone (InceptionV3 with ADL without the CAM head's dropouts, as
    wsolevaluation's ``InceptionAdl``), or ACoL's and SPG's own."""
    if backbone == "inception_v3" and method == "adl":
        return "inception_v3-cam-no-dropout"
    if method in ("acol", "spg"):
        return f"{backbone}-{method}"
    return f"{backbone}-cam"


def imagenet_fc(data: str, backbone: str, method: str) -> bool:
    """wsolevaluation starts ResNet50's classifier from the ImageNet ``fc`` on ILSVRC for the methods
    of the plain CAM network (spec 1.3)."""
    return data == "ilsvrc" and backbone == "resnet50" and method in ("cam", "has", "cutmix", "adl")


def recipe(data: str, backbone: str, method: str) -> str:
    """The text of one recipe file."""
    title, data_section, metric = DATA[data]
    method_section, method_title = METHODS[method]
    body = {
        "data": dict(data_section),
        "model": {"layout": layout(backbone, method), "pretrained": "imagenet",
                  **({"imagenet_classifier": True} if imagenet_fc(data, backbone, method) else {})},
        "method": dict(method_section),
        "optim": {"epochs": 40, "batch_size": 64, "lr": 0.01, "new_layer_lr_ratio": 10, "momentum": 0.9,
                  "weight_decay": 1.0e-4, "nesterov": True, "lr_milestones": [29], "lr_gamma": 0.1},
        "eval": {"method": "cam", "metric": metric},
        "runtime": {"out": f"runs/{data}-{backbone}-{method}"},
    }
    header = HEADER.format(title=title, backbone=BACKBONES[backbone], method_title=method_title,
                           val=data_section["val_per_class"], fsl=FSL_NOTE if method == "fsl" else "")
    return header + yaml.safe_dump(body, sort_keys=False)


#: BAS's optimization per data set (``modern-wsol.md`` section 2, the authors' ``train.py`` and
#: ``utils/``): (epochs, lr milestones, batch, loss weights); OpenImages has none of theirs
BAS_RECIPES = {"cub": (100, [80], 32, "cub"), "ilsvrc": (9, [3, 6], 128, "ilsvrc"),
               "openimages": (40, [30], 32, "cub")}
BAS_BACKBONES = ("vgg16", "resnet50", "inception_v3")
BAS_HEADER = """# {title}: {backbone} BAS (background activation suppression, Wu et al., CVPR 2022).
# Written by configs/make_recipes.py; edit that file, not this one.
# The authors' values (modern-wsol.md section 2; their train.py, utils/optimizer.py, utils/lr.py):
# SGD Nesterov, momentum 0.9, weight decay 5e-4, lr 1e-3, backbone biases x2, new layers x10 and
# their biases x20, {schedule}; loss weights beta / lambda_fg for {weights} ({beta} / {lambda_fg}),
# resize 256 + random crop 224 + flip.
# Ours: the data paths and workers, val images per class, the checkpoint choice on val (the
# authors keep every epoch's) and the calibrated evaluation of the generator's map (eval.method
# cam; their own protocol differs: see the README).{ours}
"""


def bas_recipe(data: str, backbone: str) -> str:
    """The text of one BAS recipe file."""
    from mnpo.engine.training_methods import BAS_WEIGHTS

    title, data_section, metric = DATA[data]
    epochs, milestones, batch, weights = BAS_RECIPES[data]
    beta, lambda_fg = BAS_WEIGHTS[weights][backbone]
    body = {
        "data": dict(data_section),
        "model": {"layout": f"{backbone}-bas", "pretrained": "imagenet"},
        "method": {"name": "bas", "bas_weights": weights},
        "optim": {"epochs": epochs, "batch_size": batch, "lr": 0.001, "new_layer_lr_ratio": 10, "bias_lr_ratio": 2,
                  "momentum": 0.9, "weight_decay": 5.0e-4, "nesterov": True, "lr_milestones": milestones,
                  "lr_gamma": 0.1},
        "eval": {"method": "cam", "metric": metric},
        "runtime": {"out": f"runs/{data}-{backbone}-bas"},
    }
    schedule = f"{epochs} epochs, lr x0.1 at epoch{'s' if len(milestones) > 1 else ''} " + \
        ", ".join(map(str, milestones)) + f", batch {batch}"
    if data == "openimages":
        schedule = "the schedule below (ours)"
    ours = ("\n# OpenImages: no BAS recipe of the authors; its schedule (40 epochs, x0.1 at 30, batch 32) and "
            "CUB's\n# loss weights are ours." if data == "openimages" else "")
    header = BAS_HEADER.format(title=title, backbone=BACKBONES[backbone], schedule=schedule,
                               weights=weights.upper() if weights == "cub" else "ILSVRC", beta=beta,
                               lambda_fg=lambda_fg, ours=ours)
    return header + yaml.safe_dump(body, sort_keys=False)


#: BGC's CUB recipes per backbone (the authors' configs/config_exp{,_vgg}.yaml): lr, classifier
#: ratio, weight decay, batch, large feature map
BGC_RECIPES = {"vgg16": (0.004, 5, 5.0e-4, 64, False), "resnet50": (0.002, 10, 1.0e-4, 32, True),
               "inception_v3": (0.002, 10, 1.0e-4, 32, False)}  # InceptionV3: ours (ResNet50's)
BGC_INCEPTION_HEADER = """# {title}: InceptionV3 BGC, mnpo's extension (Kim et al., CVPR 2022, trained VGG16 and ResNet50 only).
# Written by configs/make_recipes.py; edit that file, not this one.
# Every value here is ours: ResNet50's CUB recipe (lr 0.002, the head and classifier at x10, weight
# decay 0.0001, batch 32, 70 epochs of which 20 warm-up, lr x0.2 at epochs 41 and 61) and its AttentiveDrop
# and loss settings (method.bgc_*: null), the drop after Mixed_6a, InceptionCam's head without dropout,
# 14 x 14 maps, resize 256 + random crop 224 + flip.
"""
BGC_HEADER = """# {title}: {backbone} BGC (bridging the gap between classification and localization, Kim et al., CVPR 2022).
# Written by configs/make_recipes.py; edit that file, not this one.
# The authors' CUB values (modern-wsol.md section 3; their configs/config_exp{suffix}.yaml): SGD Nesterov,
# momentum 0.9, lr {lr}, the classifier{vgg_head} at x{ratio}, weight decay {wd}, batch {batch}, 70 epochs of
# which 20 warm-up (cross-entropy and the drop loss only), lr x0.2 at epochs 41 and 61, AttentiveDrop
# threshold / probability and the loss weights as mnpo's defaults for {backbone} (method.bgc_*: null),
# {lfm}resize 256 + random crop 224 + flip.
# Batch {warm_batch} during the warm-up (their warm_batch_size).
# Ours: the data paths and workers, val images per class, the checkpoint choice on val{ours}.
"""


def bgc_recipe(data: str, backbone: str) -> str:
    """The text of one BGC recipe file."""
    title, data_section, metric = DATA[data]
    lr, ratio, wd, batch, large = BGC_RECIPES[backbone]
    body = {
        "data": dict(data_section),
        "model": {"layout": f"{backbone}-bgc", "pretrained": "imagenet",
                  **({"large_feature_map": True} if large else {}),
                  **({"imagenet_classifier": True} if data == "ilsvrc" and backbone == "resnet50" else {})},
        "method": {"name": "bgc", "bgc_dataset": "ilsvrc" if data == "ilsvrc" else "cub", "bgc_warmup_epochs": 20,
                   **({"bgc_warmup_batch_size": 32} if batch != 32 else {})},
        "optim": {"epochs": 70, "batch_size": batch, "lr": lr, "new_layer_lr_ratio": ratio, "momentum": 0.9,
                  "weight_decay": wd, "nesterov": True, "lr_milestones": [40, 60], "lr_gamma": 0.2},
        "eval": {"method": "cam", "metric": metric},
        "runtime": {"out": f"runs/{data}-{backbone}-bgc"},
    }
    ours = {"cub": "", "ilsvrc": "; on ILSVRC their values are not in their repository: CUB's are used, with the "
                                 "norm loss's ILSVRC branch\n# and (ResNet50) the ImageNet fc, as their code does",
            "openimages": "; OpenImages, which they did not train: CUB's values and branch"}[data]
    if backbone == "inception_v3":
        return BGC_INCEPTION_HEADER.format(title=title) + yaml.safe_dump(body, sort_keys=False)
    header = BGC_HEADER.format(title=title, backbone=BACKBONES[backbone], suffix="_vgg" if backbone == "vgg16" else "",
                               lr=lr, ratio=ratio, wd=wd, batch=batch, warm_batch=32, vgg_head=" and conv6" if backbone == "vgg16" else "",
                               lfm="the large feature map (28 x 28), " if large else "", ours=ours)
    return header + yaml.safe_dump(body, sort_keys=False)


def deit_recipe_body(data: str, layout: str, method: dict, run: str, epochs: int, batch: int, lr: float,
                     schedule: dict) -> dict:
    """A DeiT-S recipe's body: ImageNet weights, drop-path 0.1, AdamW at one rate with weight decay
    0.05 (the transformer methods' common values), then ``schedule``'s keys."""
    _, data_section, metric = DATA[data]
    return {
        "data": dict(data_section),
        "model": {"layout": layout, "pretrained": "imagenet", "drop_path": 0.1},
        "method": method,
        "optim": {"optimizer": "adamw", "epochs": epochs, "batch_size": batch, "lr": lr, "new_layer_lr_ratio": 1.0,
                  "weight_decay": 0.05, **schedule},
        "eval": {"method": "cam", "metric": metric},
        "runtime": {"out": f"runs/{data}-{run}"},
    }


def step_milestones(steps: list[int]) -> list[int]:
    """The 0-based milestones of a rate that drops at the start of each 1-based epoch in ``steps``."""
    return [s - 1 for s in steps]


#: TS-CAM's recipes (the authors' configs/{CUB,ILSVRC}/deit_tscam_small_patch16_224.yaml and
#: train_val_{cub,ilsvrc}.sh): lr, batch, epochs, the epochs (1-based) at whose start the rate
#: drops x0.1 (their adjust_learning_rate_normal: every epoch a multiple of a step)
TSCAM_RECIPES = {"cub": (5e-5, 128, 60, [30, 60]), "ilsvrc": (5e-4, 256, 20, [10, 12, 20]),
                 "openimages": (5e-5, 128, 60, [30, 60])}  # OpenImages: ours (CUB's)
TSCAM_HEADER = """# {title}: DeiT-S TS-CAM (token semantic coupled attention maps, Gao et al., ICCV 2021).
# Written by configs/make_recipes.py; edit that file, not this one.
# The authors' values (modern-wsol.md section 4; their configs/{folder}/deit_tscam_small_patch16_224.yaml,
# train_val_{script}.sh and timm's create_optimizer): AdamW (betas 0.9 / 0.999, eps 1e-8), lr {lr}, one rate for
# every layer, weight decay 0.05 (none on biases, norms, cls_token, pos_embed), batch {batch}, {epochs} epochs,
# lr x0.1 at the start of epochs {steps} (milestones {milestones}), drop-path 0.1, DeiT-S from its ImageNet
# weights, resize 256 + random crop 224 + flip.
# Ours: the data paths and workers, val images per class, the checkpoint choice on val{ours}.
# Their own protocol resizes the map bilinearly (map option resize: bilinear); MaxBoxAccV2 here uses
# mnpo's bicubic default, as for every method.
"""


def tscam_recipe(data: str) -> str:
    """The text of one TS-CAM recipe file."""
    title = DATA[data][0]
    lr, batch, epochs, steps = TSCAM_RECIPES[data]
    milestones = step_milestones(steps)
    body = deit_recipe_body(data, "deit_small-tscam", {"name": "tscam"}, "deit_small-tscam", epochs, batch, lr,
                            {"lr_milestones": milestones, "lr_gamma": 0.1})
    ours = {"cub": "", "ilsvrc": "", "openimages": "; OpenImages, which they did not train: CUB's values"}[data]
    header = TSCAM_HEADER.format(title=title, folder="ILSVRC" if data == "ilsvrc" else "CUB",
                                 script="ilsvrc" if data == "ilsvrc" else "cub", lr=lr, batch=batch, epochs=epochs,
                                 steps=", ".join(map(str, steps)), milestones=milestones, ours=ours)
    return header + yaml.safe_dump(body, sort_keys=False)


#: SAT's recipes (the authors' train.py defaults and README): lr, batch, epochs, area target
SAT_RECIPES = {"cub": (1e-4, 256, 30, 0.25), "ilsvrc": (1.5e-5, 512, 5, 0.35),
               "openimages": (1e-4, 256, 30, 0.25)}  # OpenImages: ours (CUB's)
SAT_HEADER = """# {title}: DeiT-S SAT (spatial-aware token, Wu et al., ICCV 2023).
# Written by configs/make_recipes.py; edit that file, not this one.
# The authors' values (modern-wsol.md section 4; their train.py and Model/SAT.py): AdamW, weight decay 0.05
# (none on biases, norms, cls_token, loc_token, pos_embed, loc_embed), lr {lr} cosine to 1e-6 over {epochs}
# epochs (per epoch here; their cosine_scheduler is per step, and the loop of train.py as published computes it
# without applying it), batch {batch}, drop-path 0.1, area target {area}, the localization token gating
# blocks 9-11, DeiT-S from its ImageNet weights.
# Ours: the data paths and workers, val images per class, the training transform (mnpo's resize 256 + random
# crop 224 + flip), the checkpoint and threshold choice on val (their protocol chooses both on the test
# set){ours}.
"""


def sat_recipe(data: str) -> str:
    """The text of one SAT recipe file."""
    title = DATA[data][0]
    lr, batch, epochs, area = SAT_RECIPES[data]
    body = deit_recipe_body(data, "deit_small-sat", {"name": "sat", "sat_area": area}, "deit_small-sat", epochs,
                            batch, lr, {"lr_schedule": "cosine", "min_lr": 1e-6})
    ours = "; on OpenImages their train.py's defaults, as on CUB" if data == "openimages" else ""
    return SAT_HEADER.format(title=title, lr=lr, epochs=epochs, batch=batch, area=area, ours=ours) + \
        yaml.safe_dump(body, sort_keys=False)


#: SCM's recipes (the authors' configs/CUB/deit_scm_small_patch16_224.yaml and train_val_*.sh, run by
#: TS-CAM's train_cam.py): lr, batch, epochs, the epochs (1-based) at whose start the rate drops x0.1
SCM_RECIPES = {"cub": (5e-5, 256, 30, [30]), "ilsvrc": (1e-6, 256, 20, [10, 12, 20]),
               "openimages": (5e-5, 256, 30, [30])}
SCM_HEADER = """# {title}: DeiT-S SCM (spatial calibration module, Bai et al., ECCV 2022) on TS-CAM's network.
# Written by configs/make_recipes.py; edit that file, not this one.
# The authors' values (modern-wsol.md section 4; {source}, run by TS-CAM's
# train_cam.py): AdamW (betas 0.9 / 0.999, eps 1e-8), lr {lr}, one rate for every layer, weight decay 0.05 (none
# on biases, norms, cls_token, pos_embed), {values}, drop-path 0.1, four calibration layers (16, 4, 4, 4
# Newton-Schulz steps) in training only, DeiT-S from its ImageNet weights, resize 256 + random crop 224 + flip.
# Ours: the data paths and workers, val images per class, the checkpoint choice on val{ours}.
"""


def scm_recipe(data: str) -> str:
    """The text of one SCM recipe file."""
    title = DATA[data][0]
    lr, batch, epochs, steps = SCM_RECIPES[data]
    milestones = step_milestones(steps)
    body = deit_recipe_body(data, "deit_small-tscam", {"name": "scm"}, "deit_small-scm", epochs, batch, lr,
                            {"lr_milestones": milestones, "lr_gamma": 0.1})
    values = f"batch {batch}, {epochs} epochs, lr x0.1 at the start of epoch{'s' if len(steps) > 1 else ''} " \
             f"{', '.join(map(str, steps))} (milestones {milestones})"
    if data == "ilsvrc":
        source, values, ours = ("their train_val_ilsvrc.sh (--lr 1e-6; their ILSVRC yaml is not readable here)",
                                "the rest not known", "; batch 256, 20 epochs and lr x0.1 at the start of epochs 10, 12, "
                                "20 (milestones [9, 11, 19]): TS-CAM's ILSVRC schedule")
    else:
        source = "their configs/CUB/deit_scm_small_patch16_224.yaml and train_val_cub.sh (--lr 5e-5)"
        ours = "; OpenImages, which they did not train: CUB's values" if data == "openimages" else ""
    return SCM_HEADER.format(title=title, source=source, lr=lr, values=values, ours=ours) + \
        yaml.safe_dump(body, sort_keys=False)


def recipes() -> dict[str, str]:
    """File name -> text, for every data set, backbone and method."""
    files = {f"{d}-{b}-{m}.yaml": recipe(d, b, m) for d in DATA for b in BACKBONES for m in METHODS}
    files.update({f"{d}-{b}-bas.yaml": bas_recipe(d, b) for d in DATA for b in BAS_BACKBONES})
    files.update({f"{d}-{b}-bgc.yaml": bgc_recipe(d, b) for d in DATA for b in BGC_RECIPES})
    files.update({f"{d}-deit_small-tscam.yaml": tscam_recipe(d) for d in DATA})
    files.update({f"{d}-deit_small-sat.yaml": sat_recipe(d) for d in DATA})
    files.update({f"{d}-deit_small-scm.yaml": scm_recipe(d) for d in DATA})
    return files


def main() -> None:
    for name, text in recipes().items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
