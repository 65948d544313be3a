"""A plug-in objective, defined outside revmix (tests/objectives/plugin_objective.py) and named in a config
by its import path, trains end to end through ``revmix train``: in-process, and on a Ray Train worker,
which imports the plug-in's module when it unpickles the stage (Ray puts the driver's working directory
on its workers' ``sys.path``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.config import load_config
from tests.objectives.plugin_objective import NAME, DirectionWeightedSFT

CONFIG = f"""
name: plugin_tiny
model: {{scale: tiny, lora: {{enabled: false}}}}
data: {{source: synthetic, families: [affine_mod], n_items: 40}}
stages:
  - name: weighted
    objective: {{name: "{NAME}", alpha: 0.3}}
    steps: 3
    batch_size: 8
    warmup_steps: 1
runtime: {{num_workers: 0}}
eval: {{limit: 4, alp_limit: 4}}
"""


def _train(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    config = tmp_path / "plugin.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["train", str(config), *overrides, "--out", str(out), "--no-eval"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The run's config.yaml names the plug-in and its value, and loads again (resume, reports).
    saved = load_config(out / "config.yaml")
    assert saved.stages[0].objective == DirectionWeightedSFT(alpha=0.3)
    return json.loads((out / "summary.json").read_text()), records


def _trained(summary: dict, records: list[dict]) -> None:
    assert summary["steps"] == 3 and summary["stages"][0]["objective"] == NAME
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"loss", "nll/forward", "nll/reverse"} <= set(r) for r in records)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)


def test_a_plug_in_trains_in_process(tmp_path):
    _trained(*_train(tmp_path))


@pytest.mark.integration
@pytest.mark.slow
def test_a_plug_in_trains_on_a_ray_worker(tmp_path, ray_local):
    _trained(*_train(tmp_path, "runtime.num_workers=1", "runtime.cpus_per_worker=0.5"))
