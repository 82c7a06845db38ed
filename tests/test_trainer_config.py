"""trainer/config.py: precedence, types, ranges, registries as choices, the resolved config as a recipe."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import train
from trainer.config import TrainConfig, apply_dict, build, load_config, to_toml
from trainer.grid_config import load_grid

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model": "tiny-student", "out": "runs/x", "data.path": "train.jsonl"}


def test_config_precedence_types_and_errors(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('max_steps = 7\nstage = "kd"\n[optim]\nlr = 1\n[kd]\nteacher = "t"\nalpha = 0.25\n')
    cfg = load_config(str(recipe), {**REQUIRED, "stage": None},
                      [("max_steps", "9"), ("kd.loss", "reverse_kl"), ("out", "2024"), ("data.task", '"gsm8k"')])
    assert (cfg.max_steps, cfg.stage, cfg.optim.lr, cfg.kd.alpha, cfg.kd.loss) == (9, "kd", 1.0, 0.25, "reverse_kl")
    assert (cfg.out, cfg.data.task) == ("2024", "gsm8k")  # string fields keep the command-line text
    assert isinstance(cfg.optim.lr, float)  # TOML int accepted for a float field
    values = {}
    apply_dict(values, tomllib.loads(to_toml(cfg)), "resolved")
    assert build(TrainConfig, values) == cfg  # the written config is a recipe reproducing the run
    cases = [({"max_steps": "x"}, "'max_steps' expects int"), ({"optim.beta2": "1.5"}, "'optim.beta2' must be in [0, 1]"),
             ({"kd.loss": "kl"}, "'kd.loss' must be one of"), ({"data.max_len": "0"}, "'data.max_len' must be > 0"),
             ({"optim": "1"}, "is a section"), ({"optimizer.lr": "1"}, "unknown config key 'optimizer.lr'")]
    for override, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, REQUIRED, list(override.items()))
    with pytest.raises(ValueError, match="'kd.teacher' is required"):
        load_config(None, {**REQUIRED, "stage": "kd"}, [])
    kd = {**REQUIRED, "stage": "kd", "kd.teacher": "t"}
    with pytest.raises(ValueError, match=re.escape("'kd.on_policy_lambda' must be in [0, 1], got 1.5")):
        load_config(None, kd, [("kd.on_policy_lambda", "1.5")])
    with pytest.raises(ValueError, match="'kd.on_policy_lambda' > 0 needs config key 'parallel' = 'ddp'"):
        load_config(None, kd, [("kd.on_policy_lambda", "0.5"), ("parallel", "fsdp")])
    recipe.write_text("[data]\nbatch = 3\n")
    with pytest.raises(ValueError, match=r"r\.toml: unknown config key 'data\.batch'"):
        load_config(str(recipe), REQUIRED, [])


def test_every_recipe_loads():
    """recipes/study_*.toml are study grids (trainer/grid_config.py, tested in tests/test_study_grid.py);
    every other recipe is a train.py recipe."""
    recipes = sorted(r for r in (ROOT / "recipes").glob("*.toml") if not r.name.startswith("study_"))
    assert recipes
    for recipe in recipes:
        cfg = load_config(str(recipe), {"model": "m", "out": "o", "data.path": "d", "kd.teacher": "t"}, [])
        assert cfg.stage in ("sft", "kd", "rl"), recipe
    for grid in (ROOT / "recipes").glob("study_*.toml"):
        assert load_grid(str(grid)).methods, grid


def test_cli_overrides_parse():
    args, overrides = train.parse_args(["--max-steps", "3", "--optim.lr", "1e-3", "--set", "kd.alpha=0.5"])
    assert overrides == [("max_steps", "3"), ("optim.lr", "1e-3"), ("kd.alpha", "0.5")]
    with pytest.raises(ValueError, match="--key value"):
        train.parse_args(["--max-steps"])
