"""TS-CAM and SAT through the engine: AdamW's parameter groups, the cosine schedule, stochastic
depth and the configuration's refusals; training resumes bit-identically; `mnpo train` with
`method.name: tscam` / `sat`, then `evaluate` (the method's map and Grad-CAM of a block),
`report`, `localize` and `import-checkpoint`."""

import math

import numpy as np
import pytest
import torch
import yaml

from mnpo.cli import main
from mnpo.data.synthetic import write_synthetic_dataset
from mnpo.engine.config import ConfigError
from mnpo.engine.train import Trainer, build_optimizer
from mnpo.models import build_model, load_model
from mnpo.models.transformer_checkpoint import SCM_LAYER_KEYS, export_state_dict

from engine.test_bgc_commands import every_command_reads
from engine.test_train import Stop, config, synth  # noqa: F401  (the module's data fixture)

TSCAM = {"model": {"layout": "deit_tiny-tscam", "drop_path": 0.1},
         "method": {"name": "tscam"},
         "optim": {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05, "new_layer_lr_ratio": 1.0}}
SCM = {**TSCAM, "method": {"name": "scm"}}
SAT = {"model": {"layout": "deit_tiny-sat", "drop_path": 0.1},
       "method": {"name": "sat", "sat_area": 0.3},
       "optim": {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05, "new_layer_lr_ratio": 1.0,
                 "lr_schedule": "cosine", "min_lr": 1e-5}}


def layout_of(network):
    """SCM trains TS-CAM's network."""
    return "tscam" if network == "scm" else network


def test_adamw_decays_weight_matrices_alone_as_timm(synth, tmp_path):  # noqa: F811
    cfg = config(synth, tmp_path, **TSCAM)
    model = build_model("deit_tiny-tscam", 3, width=0.0625)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    # by hand: the patch convolution, qkv / proj / fc1 / fc2 of each block, the head's convolution
    assert decayed == {"backbone.patch_embed.proj.weight", "head.weight"} | {
        f"backbone.blocks.{b}.{m}.weight" for b in range(12) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight", "head.bias"} <= spared
    new = {names[id(p)] for g in optimizer.param_groups if g["new_layer"] for p in g["params"]}
    assert new == {"head.weight", "head.bias"} and all(g["lr"] == 5e-4 for g in optimizer.param_groups)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_the_configuration_names_what_does_not_fit(synth, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="method.name: 'plain', but model.layout 'deit_tiny-tscam' is the tscam"):
        config(synth, tmp_path, model={"layout": "deit_tiny-tscam"})
    with pytest.raises(ConfigError, match="model.layout: 'vgg16-cam' is not a tscam network; method 'tscam' needs "
                                          "'vgg16-tscam'"):
        config(synth, tmp_path, model={"layout": "vgg16-cam"}, method={"name": "tscam"})
    with pytest.raises(ConfigError, match="model.drop_path: the vgg16-cam layout cannot have 0.1"):
        config(synth, tmp_path, model={"layout": "vgg16-cam", "drop_path": 0.1})
    with pytest.raises(ConfigError, match="model.drop_path: the vgg16-bas layout cannot have 0.1 .*transformer option"):
        config(synth, tmp_path, model={"layout": "vgg16-bas", "drop_path": 0.1}, method={"name": "bas"})
    with pytest.raises(ConfigError, match=r"model.drop_path: the deit_tiny-tscam layout cannot have 1.5 .*\[0, 1\)"):
        config(synth, tmp_path, **{**TSCAM, "model": {"layout": "deit_tiny-tscam", "drop_path": 1.5}})
    with pytest.raises(ConfigError, match="model.layout: 'vgg16-cam' is not a tscam network; method 'scm' trains"):
        config(synth, tmp_path, model={"layout": "vgg16-cam"}, method={"name": "scm"})
    with pytest.raises(ConfigError, match=r"is the tscam network; set method.name: tscam \(or scm\)"):
        config(synth, tmp_path, model={"layout": "deit_tiny-tscam"}, method={"name": "bas"})
    with pytest.raises(ConfigError, match="optim.optimizer: 'adam'; choose one of"):
        config(synth, tmp_path, optim={"optimizer": "adam"})


def test_sat_spares_its_localization_token_and_the_cosine_schedule_by_hand(synth, tmp_path):  # noqa: F811
    cfg = config(synth, tmp_path, **{**SAT, "optim": {**SAT["optim"], "epochs": 4}})
    trainer = Trainer(cfg, progress=False)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    spared = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {"backbone.loc_token", "backbone.loc_embed", "backbone.cls_token", "backbone.pos_embed"} <= spared
    rates = []
    for _ in range(4):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    # epoch e of 4: 1e-5 + (5e-4 - 1e-5) (1 + cos(pi e / 4)) / 2
    assert rates == pytest.approx([1e-5 + 4.9e-4 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)], rel=1e-12)
    with pytest.raises(ConfigError, match=r"optim.min_lr: must be in \[0, optim.lr = 0.0005\], got 0.001"):
        config(synth, tmp_path, **{**SAT, "optim": {**SAT["optim"], "min_lr": 1e-3}})
    with pytest.raises(ConfigError, match="optim.lr_schedule: 'linear'; choose one of"):
        config(synth, tmp_path, **{**SAT, "optim": {**SAT["optim"], "lr_schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"method.sat_area: must be in \(0, 1\), got 1.0"):
        config(synth, tmp_path, **{**SAT, "method": {"name": "sat", "sat_area": 1.0}})
    with pytest.raises(ConfigError, match="method.name: 'sat', but model.layout 'deit_tiny-tscam' is the tscam network"):
        config(synth, tmp_path, **{**SAT, "model": {"layout": "deit_tiny-tscam"}})


@pytest.mark.numerics
@pytest.mark.parametrize("recipe", [TSCAM, SAT, SCM], ids=["tscam", "sat", "scm"])
def test_transformer_training_resumes_bit_identically_with_stochastic_depth(synth, tmp_path, recipe):  # noqa: F811
    short = {**recipe, "optim": {**recipe["optim"], "epochs": 2, "lr_milestones": [1]}}
    Trainer(config(synth, tmp_path / "full", **short), progress=False).fit()

    def stop(epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(config(synth, tmp_path / "cut", **short), progress=False, on_epoch_end=stop).fit()
    Trainer(config(synth, tmp_path / "cut", **short), resume=True, progress=False).fit()
    no_drop = {**short, "model": {"layout": recipe["model"]["layout"]}}
    Trainer(config(synth, tmp_path / "no-drop", **no_drop), progress=False).fit()
    full, payload = load_model(tmp_path / "full" / "last.pt")
    cut, _ = load_model(tmp_path / "cut" / "last.pt")
    plain, _ = load_model(tmp_path / "no-drop" / "last.pt")
    for (k, a), b in zip(full.state_dict().items(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    key = "backbone.blocks.11.mlp.fc2.weight"
    assert not torch.equal(full.state_dict()[key], plain.state_dict()[key])  # stochastic depth acted
    assert full.layout.drop_path == 0.1 and payload["training"]["config"]["optim"]["optimizer"] == "adamw"
    if recipe is SCM:  # its calibration layers resume too, and the network saved is TS-CAM's
        cut_payload = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
        full_scm, cut_scm = payload["training"]["scm"], cut_payload["training"]["scm"]
        assert all(torch.equal(full_scm[k], cut_scm[k]) for k in full_scm)
        assert full_scm["layers.0.rate"].item() != 1.0  # trained
        assert full.layout.network == "tscam"


@pytest.mark.parametrize("network", ["tscam", "sat", "scm"])
def test_transformer_methods_train_and_every_command_reads_them(tmp_path, network):
    data = tmp_path / "parts"
    write_synthetic_dataset(out=data, preset="parts", seed=4, image_size=48, num_classes=3,
                            train_per_class=6, val_per_class=2, test_per_class=3)
    config_file = tmp_path / f"{network}.yaml"
    config_file.write_text(yaml.safe_dump({
        "data": {"root": str(data / "images"), "metadata": str(data / "metadata"), "workers": 0,
                 "resize_size": 55, "crop_size": 48},
        "model": {"layout": f"deit_tiny-{layout_of(network)}", "width": 0.0625, "pretrained": None, "drop_path": 0.1},
        "method": {"name": network},
        "optim": {"optimizer": "adamw", "epochs": 2, "batch_size": 6, "lr": 5e-4, "weight_decay": 0.05,
                  "new_layer_lr_ratio": 1.0, "lr_milestones": [1], "lr_gamma": 0.1},
        "eval": {"method": "cam"},
        "runtime": {"out": str(tmp_path / "run"), "device": "cpu", "channels_last": False},
    }))
    assert main(["train", "--config", str(config_file), "-q"]) == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    values = [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert len(values) == 2 and all(np.isfinite(float(v["train_loss"])) for v in values)
    assert abs(float(values[1]["lr"]) - 5e-5) < 1e-12
    every_command_reads(tmp_path, data, "blocks.10")
    # the authors' format, written from the full-width network, read back by import-checkpoint
    model = build_model(f"deit_tiny-{layout_of(network)}", 3)
    theirs = tmp_path / "model_best.pth"
    key = "model" if network == "sat" else "state_dict"  # as their train.py / train_cam.py save
    state = export_state_dict(model)
    if network == "scm":
        state.update({k: torch.rand(1) for k in SCM_LAYER_KEYS})
    torch.save({"epoch": 1, key: {f"module.{k}": v for k, v in state.items()}}, theirs)
    assert main(["import-checkpoint", "--from", network, str(theirs), str(tmp_path / "imported.pt")]) == 0
    imported, _ = load_model(tmp_path / "imported.pt")
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))
