from pathlib import Path

import pytest

from mnpo.engine.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
MINIMAL = {"data": {"root": "images", "metadata": "metadata"}}


def test_defaults_are_the_released_recipe():
    cfg = config_from_dict(MINIMAL)
    assert cfg.optim.lr == 0.0008 and cfg.optim.batch_size == 100 and cfg.optim.new_layer_lr_ratio == 15
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.nesterov
    assert cfg.model.layout == "vgg16-mnpo" and cfg.model.pretrained == "imagenet"
    assert cfg.eval.method == "mnpos"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), TrainConfig)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  root: /data/images\n  metadata: /data/meta\noptim:\n  epochs: 5\n")
    cfg = load_config(path, ["optim.lr=0.01", "model.pretrained=null", "optim.lr_milestones=[2, 4]",
                             "runtime.precision=bf16", "optim.weight_decay=5e-4"])
    assert cfg.optim.epochs == 5 and cfg.optim.lr == 0.01 and cfg.model.pretrained is None
    assert cfg.optim.weight_decay == 5e-4  # YAML 1.1 reads 5e-4 as a string; numbers are meant
    assert cfg.optim.lr_milestones == [2, 4] and cfg.runtime.precision == "bf16"
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lrr": 1}}, "unknown key 'optim.lrr'"),
        ({"optimizer": {}}, "unknown key 'optimizer'"),
        ({"optim": {"epochs": "ten"}}, "optim.epochs: expected an integer, got 'ten'"),
        ({"optim": {"epochs": 0}}, "optim.epochs: must be >= 1, got 0"),
        ({"optim": {"nesterov": "yes"}}, "optim.nesterov: expected true or false"),
        ({"optim": {"lr_milestones": [8, 4]}}, "optim.lr_milestones: must be increasing"),
        ({"optim": {"lr_milestones": [2, "x"]}}, r"optim.lr_milestones\[1\]: expected an integer"),
        ({"model": {"layout": "vgg19"}}, "model.layout: 'vgg19' is neither"),
        ({"eval": {"method": "lrp"}}, "eval.method: 'lrp'"),
        ({"eval": {"metric": "iou"}}, "eval.metric: 'iou'"),
        ({"runtime": {"precision": "fp8"}}, "runtime.precision: 'fp8'"),
        ({"data": {"root": ""}}, "data.root: required"),
        ({"model": []}, "model: expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    merged = {**MINIMAL, **data}
    if "data" in data:
        merged["data"] = {**MINIMAL["data"], **data["data"]}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(merged, source="run.yaml")


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {root: a, metadata: b}\noptim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'optim.lrr'"):
        load_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    for text in ("optim.lr", "=3", "optim..lr=1"):
        with pytest.raises(ConfigError, match="override"):
            parse_override(text)


def test_wsol_recipes_on_disk_are_what_their_generator_writes():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "configs" / "make_recipes.py"
    spec = importlib.util.spec_from_file_location("make_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.recipes()
    assert len(written) == 3 * 3 * 8 + 3 * 3 + 3 * 3  # data sets x backbones x methods (BAS included), BGC, TS-CAM, SAT, SCM
    for name, text in written.items():
        on_disk = path.parent / name
        assert on_disk.is_file() and on_disk.read_text() == text, f"{name}: run python configs/make_recipes.py"
        cfg = load_config(on_disk)
        backbone, method = name.split("-")[1], name.split("-")[2].removesuffix(".yaml")
        network = {"scm": "tscam"}.get(method, method if method in ("acol", "spg", "bas", "bgc", "tscam", "sat") else "cam")
        assert cfg.model.layout.startswith(f"{backbone}-{network}")
        assert cfg.method.name == ("plain" if method == "cam" else method)


def test_imagenet_classifier_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="model.imagenet_classifier: needs model.pretrained"):
        config_from_dict({"data": {"root": "r", "metadata": "m"},
                          "model": {"layout": "resnet50-cam", "pretrained": None, "imagenet_classifier": True}})
