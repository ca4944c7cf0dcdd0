"""configs/: a folder per benchmark, its base.yaml beside one small file per experiment, composed with
``--config configs/<benchmark>/base.yaml --config configs/<benchmark>/<experiment>.yaml``. Every
experiment resolves, names that pair in its own header command, and resolves to its base's values
overridden by its own (dicts key by key, lists whole). No YAML sits at the top of configs/, so a
one-file command with an old path (``--config configs/domainnet_joint.yaml``) fails loudly."""
import re
from pathlib import Path

import pytest
import yaml

from experiments.fit import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

BENCHMARKS = ("imagenet_to_sketch", "domainnet", "decathlon")

#: Every experiment file (its path under configs/; its base is base.yaml in the same folder) and what
#: it is, resolved: backbone, mode, tasks (None: all of the benchmark's), epochs, run name.
WHAT = {
    **{f"imagenet_to_sketch/{t}.yaml": ("resnet50", "incremental", [t], 30, f"i2s_{t}")
       for t in ("flowers", "stanford_cars_cropped", "sketches", "cubs_cropped", "wikiart")},
    **{f"imagenet_to_sketch/arch_sweep_{b}.yaml": (b, "incremental", ["flowers"], 30, f"arch_{b}_flowers")
       for b in ("resnet50", "densenet121", "vit_base_patch16_224")},
    "imagenet_to_sketch/authors_recipe.yaml": ("resnet50", "incremental", ["flowers"], 31, "authors_recipe_flowers"),
    **{f"domainnet/{m}.yaml": ("resnet34", m, None, 30, f"domainnet_{m}")
       for m in ("incremental", "joint", "memory_efficient")},
    "decathlon/lambda_0.25.yaml": ("resnet26", "incremental", ["aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb",
                                                               "vgg-flowers", "omniglot", "svhn", "ucf101"],
                                   120, "decathlon"),
}

#: The single-file presets before the split, each a complete config then; given alone today, an
#: experiment file would silently run the offline default data with a few settings changed.
OLD_PRESETS = (
    *(f"imagenet_to_sketch_{t}.yaml" for t in ("flowers", "stanford_cars_cropped", "sketches", "cubs_cropped",
                                               "wikiart")),
    *(f"arch_sweep_{b}.yaml" for b in ("resnet50", "densenet121", "vit_base_patch16_224")),
    "authors_recipe.yaml",
    *(f"domainnet_{m}.yaml" for m in ("incremental", "joint", "memory_efficient")),
    "decathlon.yaml",
)


def base_of(name: str) -> Path:
    return CONFIGS / Path(name).parent / "base.yaml"


class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) {duplicates} given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=StrictLoader)


def resolve(capsys, *configs: Path) -> dict:
    """What ``experiments.fit --config A --config B ... --print_config`` prints, as a dict."""
    args = [a for path in configs for a in ("--config", str(path))]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def leaves(tree: dict, prefix: str = "") -> dict:
    """``{"data.init_args.tasks": [...], ...}``: dicts are walked, lists and scalars are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def at(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


MISSING = object()


def at_or_missing(tree: dict, dotted: str):
    try:
        return at(tree, dotted)
    except (KeyError, TypeError):
        return MISSING


def test_every_benchmark_folder_has_a_base_and_the_experiments_listed():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(BENCHMARKS)  # folders only, nothing else
    for benchmark in BENCHMARKS:
        assert (CONFIGS / benchmark / "base.yaml").is_file()
        assert not [p for p in (CONFIGS / benchmark).iterdir() if p.suffix != ".yaml"]
    experiments = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml") if p.name != "base.yaml")
    assert experiments == sorted(WHAT)


def test_no_config_at_the_top_of_configs_so_old_one_file_commands_fail_loudly(capsys):
    """Every old single-file preset path is gone (no file of any kind at the top of configs/), and
    ``fit --config configs/<old>.yaml`` exits with an error naming the file instead of training."""
    assert not [p for p in CONFIGS.iterdir() if not p.is_dir()]
    for old in OLD_PRESETS:
        assert not (CONFIGS / old).exists(), old
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(CONFIGS / old), "--print_config"])
        assert exit_info.value.code not in (0, None), old
        captured = capsys.readouterr()
        assert "does not exist" in captured.err and old in captured.err, old
        assert not captured.out.strip(), old  # no config was printed


@pytest.mark.parametrize("name", sorted(WHAT))
def test_experiment_resolves_over_its_base(name, capsys):
    """The composed config resolves, the file's header gives that exact pair, and the result is the
    base's values with the experiment file's own on top (every value either file writes is there)."""
    base, experiment = base_of(name), CONFIGS / name
    header = " ".join(line.lstrip("# ").rstrip("\\ ") for line in experiment.read_text().splitlines()
                      if line.startswith("#"))
    folder = re.escape(str(Path(name).parent))
    assert re.search(rf"experiments\.fit --config configs/{folder}/base\.yaml +--config configs/{re.escape(name)} ",
                     header), f"{name}'s header does not show its command"

    resolved = resolve(capsys, base, experiment)
    expected = {**leaves(load(base)), **leaves(load(experiment))}
    for key, value in expected.items():
        assert at(resolved, key) == value, key
    model, data, trainer = resolved["model"], resolved["data"]["init_args"], resolved["trainer"]
    assert (model["backbone"], model["mode"], data["tasks"], trainer["max_epochs"],
            trainer["logger"]["init_args"]["name"]) == WHAT[name]


def test_overrides_override_the_base(capsys):
    """Two ImageNet-to-Sketch variants differ where their files say, and share what only the base sets."""
    base = CONFIGS / "imagenet_to_sketch" / "base.yaml"
    flowers = resolve(capsys, base, CONFIGS / "imagenet_to_sketch" / "flowers.yaml")
    wikiart = resolve(capsys, base, CONFIGS / "imagenet_to_sketch" / "wikiart.yaml")
    assert flowers["data"]["init_args"]["tasks"] == ["flowers"] and wikiart["data"]["init_args"]["tasks"] == ["wikiart"]
    assert flowers["trainer"]["logger"]["init_args"]["name"] == "i2s_flowers"
    assert wikiart["trainer"]["logger"]["init_args"]["name"] == "i2s_wikiart"
    for cfg in (flowers, wikiart):  # only the base sets these (fit's own defaults differ)
        assert cfg["data"]["class_path"] == "datamodules.ImageNetToSketch"
        assert cfg["data"]["init_args"]["root"] == "/data/imagenet_to_sketch"
        assert cfg["data"]["init_args"]["image_size"] == 224 and cfg["data"]["init_args"]["num_workers"] == 8
        assert cfg["model"]["backbone"] == "resnet50" and cfg["model"]["weights"] is None
        assert cfg["trainer"]["max_epochs"] == 30 and cfg["trainer"]["precision"] == "bf16-mixed"
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "logs"
    differ = {k: v for k, v in leaves(flowers).items() if at_or_missing(wikiart, k) != v}
    assert differ == {"data.init_args.tasks": ["flowers"], "trainer.logger.init_args.name": "i2s_flowers"}

    recipe = resolve(capsys, base, CONFIGS / "imagenet_to_sketch" / "authors_recipe.yaml")
    assert recipe["trainer"]["max_epochs"] == 31 and recipe["trainer"]["precision"] == "32-true"
    assert recipe["model"]["lr"] == 0.08 and recipe["trainer"]["accumulate_grad_batches"] == 8
    assert recipe["data"]["init_args"]["batch_size"] == 32  # the base's


def test_later_config_merges_dicts_and_replaces_lists(capsys, tmp_path):
    """The README's rule: a later file overrides key by key, also inside init_args, but a list is
    replaced whole (data.init_args.tasks, trainer.callbacks), never appended to."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]}}))
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "data": {"init_args": {"tasks": ["dtd"]}},
        "trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                                   "init_args": {"monitor": "val/acc"}}]},
    }))
    cfg = resolve(capsys, CONFIGS / "decathlon" / "base.yaml", base, override)
    assert cfg["data"]["init_args"]["tasks"] == ["dtd"]  # not the base's nine plus dtd
    assert cfg["data"]["class_path"] == "datamodules.VisualDecathlon"  # the rest of data is the base's
    assert cfg["data"]["init_args"]["train_on_trainval"] is True and cfg["data"]["init_args"]["batch_size"] == 128
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == ["lightning.pytorch.callbacks.EarlyStopping"]


def test_experiment_file_without_its_base_is_refused(capsys):
    """Alone, configs/domainnet/joint.yaml would train the offline digits in joint mode: fit
    refuses it before anything is built, naming the base to pass first; with the base first
    (or with a run's own config.yaml, which has no base.yaml beside it) the check passes."""
    from experiments.fit import main
    from experiments.run.inputs import check_config_order
    from taps_lightning.training.checks import SettingsError

    base, joint = ROOT / "configs" / "domainnet" / "base.yaml", ROOT / "configs" / "domainnet" / "joint.yaml"
    with pytest.raises(SettingsError, match=r"joint.yaml overrides .*domainnet/base.yaml, which was not given"):
        main(["--config", str(joint), "--trainer.default_root_dir", "/nonexistent-never-created"])
    with pytest.raises(SettingsError, match="domainnet/base.yaml"):
        check_config_order([joint, base])  # the base after its override: the override would be undone
    check_config_order([base, joint])
    check_config_order([ROOT / "configs" / "imagenet_to_sketch" / "base.yaml", joint.parent / "base.yaml", joint])
