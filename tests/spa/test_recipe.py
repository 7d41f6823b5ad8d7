"""The paper-scale recipe's configs (docs/recipe-paper-scale.md) load and validate with `spa config` (no model or data
is downloaded), and hold the settings the recipe documents."""

import os
import re

import pytest

from spa import Config
from spa.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
RECIPE = os.path.join(ROOT, "docs", "recipe-paper-scale.md")


@pytest.mark.parametrize("name", ["paper_ultrafeedback_7b.yaml", "paper_ultrafeedback_7b_lora.yaml"])
def test_recipe_config_validates(name, capsys):
    path = os.path.join(CONFIGS, name)
    assert main(["config", path]) == 0
    assert capsys.readouterr().out.startswith("output_dir: runs/zephyr-7b-spa")
    cfg = Config.load(path)
    assert cfg.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert cfg.data.seed_size == 0.033 and cfg.data.iteration_prompts == [8000, 20000, 30000]
    assert cfg.loop.iterations == 3 and cfg.train.batch_size == 32 and cfg.generate.num_samples == 2
    assert (cfg.model.peft is not None) == name.endswith("_lora.yaml")


def test_recipe_names_shipped_configs_and_existing_keys():
    """Every configs/*.yaml the recipe names exists, and every `section.key` it shows is a config key."""
    from spa.config import keys

    text = open(RECIPE, encoding="utf-8").read()
    for name in set(re.findall(r"configs/[\w.-]+\.yaml", text)):
        assert os.path.exists(os.path.join(ROOT, name)), name
    known = {k for k, *_ in keys()}
    sections = {k.split(".")[0] for k in known}
    for key in set(re.findall(r"`(?:--set )?([a-z_]+\.[a-z_]+)[=`]", text)):
        if key.split(".")[0] in sections:
            assert key in known, key
