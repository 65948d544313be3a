"""``revmix eval``: outputs on disk, run-directory resolution with the run's data split, loud errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from revmix.cli import main
from revmix.platform.evaluation.benchmarks import load_benchmark
from revmix.platform.evaluation.cli import benchmark_names, run_data_kwargs
from tests.platform.generation.helpers import varied_model_dir


def test_eval_writes_json_markdown_and_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["eval", "--model", varied_model_dir(), "--benchmarks", "synthetic", "--limit", "4"]
    argv += ["--max-new-tokens", "6", "--alp-tokens", "16", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    bench = result["benchmarks"]["synthetic"]
    assert bench["n"] == 4 and 0.0 <= bench["accuracy"] <= 1.0
    assert sum(d["n"] for d in bench["by_direction"].values()) == 4
    assert result["alp"]["forward"]["n"] + result["alp"]["reverse"]["n"] == 4
    assert result["settings"]["limit"] == 4 and result["settings"]["benchmarks"] == ["synthetic"]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [
        it.id for it in load_benchmark("synthetic", limit=4)
    ]
    md = (out / "eval.md").read_text()
    assert "| synthetic |" in md and "ALP(y+)" in md and "| this model | forward |" in md
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["synthetic"] == bench["accuracy"]


def test_run_dir_uses_final_model_and_the_runs_split(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(varied_model_dir(), run / "model")
    data = {
        "source": "synthetic",
        "families": ["affine_mod"],
        "n_items": 20,
        "seed": 3,
        "test_fraction": 0.25,
    }
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "x", "data": data}))
    kw = run_data_kwargs(str(run), seed=0)
    assert kw == {
        "seed": 3,
        "synthetic_families": ["affine_mod"],
        "synthetic_n": 20,
        "synthetic_test_fraction": 0.25,
    }
    out = tmp_path / "eval"
    argv = ["eval", "--run", str(run), "--benchmarks", "synthetic", "--max-new-tokens", "4", "--no-alp"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == [it.id for it in load_benchmark("synthetic", **kw)]
    result = json.loads((out / "eval.json").read_text())
    assert result["alp"] == {} and result["settings"]["model"] == str(run / "model")


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "o")]
    assert main(["eval", "--benchmarks", "synthetic", *out]) == 2
    assert "--model PATH or --run DIR" in capsys.readouterr().err
    assert main(["eval", "--generator", "openai", "--benchmarks", "synthetic", *out]) == 2
    assert "--endpoint" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "synthetic", *out]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    assert main(["eval", "--model", varied_model_dir(), "--benchmarks", "mmlu", *out]) == 2
    assert "unknown benchmark 'mmlu'" in capsys.readouterr().err
    assert benchmark_names(["gsm8k,math500", "synthetic"]) == ["gsm8k", "math500", "synthetic"]
