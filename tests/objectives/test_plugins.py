"""Plug-in objectives: named by import path or installed under an entry point, validated by their own
fields in experiment configs and multitask routes, listed and checked by ``revmix objectives``."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.config import ExperimentConfig, build_config, describe, to_dict
from revmix.objectives import base
from revmix.objectives.base import (
    build_objective,
    known_objective_names,
    objective_class,
    objective_names,
)
from revmix.validation import ConfigError
from tests.objectives.helpers import make_batch, responses, row_token_logps, tiny_lm
from tests.objectives.plugin_objective import (
    BROKEN,
    NAME,
    DirectionWeightedSFT,
    InstalledWeightedSFT,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
MODULE = "tests.objectives.plugin_objective"


def _stages(objective: dict) -> dict:
    return {"stages": [{"steps": 1}, {"steps": 2, "objective": objective}]}


def _install(monkeypatch, **points: str) -> None:
    """Pretend an installed distribution declares ``points`` (name = "module:Class") for revmix."""
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, value, "revmix.objectives") for name, value in points.items()
    )
    real = importlib.metadata.entry_points

    def entry_points(**params):
        return eps.select(**params) if params.get("group") == "revmix.objectives" else real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_an_import_path_names_a_plug_in_validated_by_its_own_fields():
    cfg = build_config(_stages({"name": NAME, "alpha": 0.3}))
    assert type(cfg.stages[1].objective) is DirectionWeightedSFT and cfg.stages[1].objective.alpha == 0.3
    assert to_dict(cfg)["stages"][1]["objective"] == {"name": NAME, "alpha": 0.3}
    assert build_config(to_dict(cfg)) == cfg  # a run's config.yaml loads again
    assert objective_class(NAME) is DirectionWeightedSFT
    assert NAME not in objective_names()  # found, not registered: the contract suite's list stays built-in


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ({"name": NAME, "alpha": -1}, "stages.1.objective.alpha: expected a number in [0, 10], got -1"),
        (
            {"name": NAME, "alpah": 1},
            f"stages.1.objective.alpah: unknown key 'alpah' for objective '{NAME}' (did you mean 'alpha'?); "
            "valid keys: alpha",
        ),
        (
            {"name": f"{MODULE}:DirectionWeightedSTF"},
            f"stages.1.objective.name: objective '{MODULE}:DirectionWeightedSTF': '{MODULE}' has no attribute "
            "'DirectionWeightedSTF' (did you mean 'DirectionWeightedSFT'?); built-in objectives: ",
        ),
        (
            {"name": "tests.objectives.no_such_module:X"},
            "stages.1.objective.name: objective 'tests.objectives.no_such_module:X': cannot import module "
            "'tests.objectives.no_such_module'",
        ),
        (
            {"name": f"{MODULE}:NAME"},
            f"stages.1.objective.name: objective '{MODULE}:NAME': '{NAME}' (a str) is not a subclass of "
            "revmix.objectives.base.Objective",
        ),
        (
            {"name": f"{MODULE}:InstalledWeightedSFT"},
            "InstalledWeightedSFT declares name 'weighted_sft'; a plug-in's name literal is the name configs "
            f"use: name: Literal['{MODULE}:InstalledWeightedSFT']",
        ),
        ({"name": "tests objectives:X"}, "'tests objectives:X' is not an import path pkg.module:ClassName"),
        ({"alpha": 1}, "stages.1.objective.name: required key missing; one of complementary_dpo, cpo, dpo,"),
    ],
)
def test_bad_plug_ins_are_loud_and_name_the_path(objective, message):
    with pytest.raises(ConfigError) as e:
        build_config(_stages(objective))
    assert message in str(e.value)


def test_import_errors_list_the_built_in_objectives():
    with pytest.raises(ConfigError, match=r"built-in objectives: (\w+, )*dpo, (\w+, )*sft"):
        build_config(_stages({"name": "tests.objectives.no_such_module:X"}))


def test_overrides_reach_a_plug_in_and_its_errors_name_the_path():
    cfg = build_config({"stages": [{"steps": 1}]}, [f"stages.0.objective.name={NAME}"])
    assert cfg.stages[0].objective.alpha == 0.5  # its own default
    with pytest.raises(
        ConfigError, match=r"stages\.0\.objective\.alpha: expected a number in \[0, 10\], got 20"
    ):
        build_config(
            {"stages": [{"steps": 1}]}, [f"stages.0.objective.name={NAME}", "stages.0.objective.alpha=20"]
        )


def test_multitask_routes_take_plug_ins():
    spec = {
        "name": "multitask",
        "routes": [{"objective": {"name": NAME, "alpha": 2.0}, "direction": "reverse"}],
    }
    objective = build_objective(spec)
    assert objective.routes[0].objective == DirectionWeightedSFT(alpha=2.0)
    bad = {"name": "multitask", "routes": [{"objective": {"name": NAME, "alpha": -2}}]}
    with pytest.raises(
        ConfigError, match=r"^stages\.0\.objective\.routes\.0\.objective\.alpha: expected a number"
    ):
        build_objective(bad, path="stages.0.objective")


def test_an_objective_registered_after_import_validates(monkeypatch):
    """The config type looks names up when a value is read, not when the config module was imported."""
    monkeypatch.setitem(base._REGISTRY, "weighted_sft", InstalledWeightedSFT)
    cfg = build_config(_stages({"name": "weighted_sft", "alpha": 0.25}))
    assert cfg.stages[1].objective == InstalledWeightedSFT(alpha=0.25)


def test_installed_plug_ins_load_lazily_by_name(monkeypatch):
    _install(
        monkeypatch,
        weighted_sft=f"{MODULE}:InstalledWeightedSFT",
        broken="tests.objectives.no_such_module:Objective",
    )
    # Listing names imports nothing: the broken plug-in only fails when it is named.
    assert {"weighted_sft", "broken", "sft"} <= set(known_objective_names())
    cfg = build_config(_stages({"name": "weighted_sft", "alpha": 0.25}))
    assert cfg.stages[1].objective == InstalledWeightedSFT(alpha=0.25)
    with pytest.raises(
        ConfigError, match=r"stages\.1\.objective\.alpha: expected a number in \[0, 10\], got 11"
    ):
        build_config(_stages({"name": "weighted_sft", "alpha": 11}))
    with pytest.raises(ConfigError) as e:
        build_config(_stages({"name": "broken"}))
    assert str(e.value).startswith("stages.1.objective.name: objective 'broken': installed plug-in 'broken'")
    assert "No module named 'tests.objectives.no_such_module'" in str(e.value)
    with pytest.raises(
        ConfigError, match=r"'wieghted_sft' is not one of .*\(did you mean 'weighted_sft'\?\)"
    ):
        build_config(_stages({"name": "wieghted_sft"}))


def test_help_config_and_json_schema_cover_installed_plug_ins(monkeypatch):
    _install(monkeypatch, weighted_sft=f"{MODULE}:InstalledWeightedSFT")
    lines = describe()
    assert (
        "stages.N.objective (name: weighted_sft): DirectionWeightedSFT as an installed package would "
        "declare it: under its entry-point name." in lines
    )
    assert "stages.N.objective.alpha = 0.5  # weight of a reverse row's tokens (forward: 1)" in lines
    schema = ExperimentConfig.model_json_schema()["$defs"]["StageConfig"]["properties"]["objective"]
    names = [s["properties"]["name"]["const"] for s in schema["oneOf"]]
    assert names == known_objective_names() and "weighted_sft" in names
    assert schema["discriminator"] == {"propertyName": "name"}


# --------------------------------------------------------------------------------------------------
# The documented example and `revmix objectives`
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def example(monkeypatch):
    """docs/examples on sys.path, as PYTHONPATH=docs/examples does for the command line."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import my_objective

    return my_objective


def test_the_docs_show_the_example_file():
    """docs/objectives.md's code block is docs/examples/my_objective.py, so the two cannot drift apart."""
    docs = (EXAMPLES.parent / "objectives.md").read_text()
    block = docs.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == (EXAMPLES / "my_objective.py").read_text()


def test_the_documented_example_computes_focal_loss(example):
    """Lin et al. 2017 per response token, recomputed unpadded in float64: −(1 − p)^γ log p, averaged."""
    model, batch = tiny_lm(), make_batch()
    gamma = 2.0
    terms = [
        -((1 - math.exp(lp)) ** gamma) * lp
        for prompt, response in zip(batch.prompt_ids, responses(batch.labels))
        for lp in row_token_logps(model, prompt, response)
    ]
    got = float(
        build_objective({"name": "my_objective:FocalSFT", "gamma": gamma})(model, batch).loss.detach()
    )
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5, abs=1e-6)
    plain = float(build_objective({"name": "sft"})(model, batch).loss.detach())
    focal0 = float(example.FocalSFT(gamma=0.0)(model, batch).loss.detach())
    assert focal0 == pytest.approx(plain, rel=1e-5, abs=1e-6)  # gamma 0 is SFT


def test_objectives_check_passes_the_documented_example(example, capsys):
    assert main(["objectives", "check", "my_objective:FocalSFT"]) == 0
    out = capsys.readouterr().out
    assert "PASS  finite_loss_and_direction_metrics\n" in out and "FAIL" not in out
    assert "SKIP  shared_prompt_reference_gives_the_same_loss: needs no reference" in out


def test_objectives_check_fails_a_broken_plug_in_with_messages(capsys):
    assert main(["objectives", "check", BROKEN]) == 1
    out = capsys.readouterr().out
    assert "FAIL  finite_loss_and_direction_metrics: no metric ends in '/forward'" in out
    assert "FAIL  requires_declares_other_response: a batch without y− failed" in out
    assert out.rstrip().endswith(f"{BROKEN}: 7 passed, 2 failed, 1 skipped")
    assert main(["objectives", "check", BROKEN, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert [c["check"] for c in report["checks"] if c["status"] == "fail"] == [
        "finite_loss_and_direction_metrics",
        "requires_declares_other_response",
    ]


def test_objectives_check_refuses_what_it_cannot_build(capsys):
    assert main(["objectives", "check", f"{MODULE}:Nope"]) == 2
    assert f"'{MODULE}' has no attribute 'Nope'" in capsys.readouterr().err


def test_objectives_list_shows_each_hyper_parameter(capsys):
    assert main(["objectives", "list", "sft", NAME]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    sft = blocks[0].splitlines()
    assert sft[0].startswith("sft — Cross-entropy on y+ tokens")
    assert sft[1] == "  built-in: revmix.objectives.sft:SFT"
    assert sft[2].split() == ["hyper-parameter", "type", "default", "range", "description"]
    assert sft[3].split(maxsplit=4) == [
        "label_smoothing",
        "float",
        "0.0",
        "[0,",
        "1)  mass spread uniformly over the vocabulary (0: plain cross-entropy)",
    ]
    plugin = blocks[1].splitlines()
    assert plugin[1] == f"  plug-in: {MODULE}:DirectionWeightedSFT"
    assert plugin[3].split(maxsplit=4)[:4] == ["alpha", "float", "0.5", "[0,"]
    assert main(["objectives", "list"]) == 0
    headers = [b.splitlines()[0].split(" — ")[0] for b in capsys.readouterr().out.split("\n\n")]
    assert headers == known_objective_names()


def test_the_console_script_checks_a_plug_in_from_the_working_directory():
    """``revmix`` (a console script: no working directory on ``sys.path``) still finds a module under it,
    as ``python -m`` would; here the test's own plug-in, run from the repository root."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "revmix"), "objectives", "check", NAME],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout
