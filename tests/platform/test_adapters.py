"""Stage artifacts: LoRA stages save their adapter (and adapter chain); ``save.merged`` adds the full model.

Two tiny two-stage LoRA runs, identical but for ``save.merged``: the adapter-only run stores no full model,
its second stage starts from base + stage-0 adapter merged in memory and trains exactly as the run that
started from the merged copy on disk, and every reader (``load_model``, ``revmix eval``) takes either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from revmix.cli import main
from revmix.config import load_config
from revmix.platform.artifacts import CHAIN_FILE, AdapterChain, read_chain, resolve_chain
from revmix.platform.evaluation.cli import _loadable
from revmix.platform.generation.protocol import full_model_only, resolve_model_dir
from revmix.platform.models import (
    architecture_dir,
    full_model_dir,
    load_model,
    model_identity,
    resolve_model_path,
)
from revmix.platform.run_dir import link_final_model
from revmix.platform.storage import Store
from revmix.platform.train import run_experiment

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"  # LoRA r 16 on all seven projections of the tiny model
TWO_LORA_STAGES = [
    "data.n_items=40",
    "model.base=random",  # the adapters' base is the random tiny model the checks below rebuild
    "model.lora.enabled=true",
    "stages=[{name: a, steps: 2, batch_size: 4, warmup_steps: 0},"
    " {name: b, steps: 2, batch_size: 4, warmup_steps: 0}]",
]
# Tiny model (hidden 128, 4 layers, kv 64, intermediate 512), r = 16: per layer q 16·(128+128) = 4096,
# k and v 16·(128+64) = 3072 each, o 4096, gate/up/down 16·(128+512) = 10240 each: 45,056; × 4 layers.
ADAPTER_PARAMS = 4 * (4096 + 3072 + 3072 + 4096 + 3 * 10240)
MODEL_PARAMS = 1_050_752  # the tiny scale (revmix.platform.models.SCALES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for merged in (False, True):
        cfg = load_config(SFT, [*TWO_LORA_STAGES, f"save.merged={str(merged).lower()}"])
        out["merged" if merged else "adapter"] = run = root / ("merged" if merged else "adapter")
        run_experiment(cfg, run, evaluate=False)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.slow  # the two runs: ~2 min on 2 cores
def test_lora_stages_save_the_adapter_alone(runs: dict[str, Path]) -> None:
    run = runs["adapter"]
    base = resolve_model_path(None)
    for i in (0, 1):
        stage = run / "stages" / str(i)
        assert not (stage / "model").exists()
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {
            p.name for p in (stage / "adapter").iterdir()
        }
        assert _params(stage / "adapter" / "adapter_model.safetensors") == ADAPTER_PARAMS
    assert read_chain(run / "stages" / "1") == AdapterChain(
        base, False, ("stages/0/adapter", "stages/1/adapter")
    )
    assert os.readlink(run / "model") == os.path.join("stages", "1")
    assert json.loads((run / "summary.json").read_text())["final_model"] == str(run / "stages" / "1")
    adapter = (run / "stages" / "0" / "adapter" / "adapter_model.safetensors").stat().st_size
    full = (runs["merged"] / "stages" / "0" / "model" / "model.safetensors").stat().st_size
    assert adapter == pytest.approx(4 * ADAPTER_PARAMS, rel=0.01)  # float32 + a small header
    assert full == pytest.approx(4 * MODEL_PARAMS, rel=0.01)
    assert adapter < 0.2 * full  # 180,224 vs 1,050,752 parameters: 17%


@pytest.mark.slow  # the two runs: ~2 min on 2 cores
def test_save_merged_writes_the_adapter_and_the_full_model(runs: dict[str, Path]) -> None:
    run = runs["merged"]
    for i in (0, 1):
        assert (run / "stages" / str(i) / "model" / "config.json").is_file()
        assert (run / "stages" / str(i) / "adapter" / "adapter_model.safetensors").is_file()
    # stage b started from stage a's merged model: its chain sits on that, not on the base
    assert read_chain(run / "stages" / "1") == AdapterChain("stages/0/model", True, ("stages/1/adapter",))
    assert os.readlink(run / "model") == os.path.join("stages", "1", "model")


@pytest.mark.slow  # the two runs: ~2 min on 2 cores
def test_the_next_stage_starts_from_base_plus_adapter_as_from_the_merged_copy(runs: dict[str, Path]) -> None:
    a, m = _records(runs["adapter"]), _records(runs["merged"])
    assert [(r["stage"], r["step"]) for r in a] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for ra, rm in zip(a, m):  # stage b's first step included: same start weights (and the same fresh
        # adapter: loading a chain leaves the RNG as loading a full model does), same losses
        assert ra["loss"] == pytest.approx(rm["loss"], rel=1e-5), (ra["stage"], ra["step"])
    for i in (0, 1):
        chained = load_model(str(runs["adapter"] / "stages" / str(i))).state_dict()
        merged = load_model(str(runs["merged"] / "stages" / str(i) / "model")).state_dict()
        assert chained.keys() == merged.keys()
        for k in chained:
            torch.testing.assert_close(chained[k].double(), merged[k].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the two runs: ~2 min on 2 cores
def test_revmix_eval_reads_an_adapter_run_as_the_merged_one(runs: dict[str, Path], tmp_path: Path) -> None:
    preds = {}
    for name, run in runs.items():
        out = tmp_path / name
        argv = ["eval", "--run", str(run), "--benchmarks", "synthetic", "--limit", "4"]
        assert main([*argv, "--max-new-tokens", "8", "--alp-tokens", "8", "--out", str(out), "--quiet"]) == 0
        result = json.loads((out / "eval.json").read_text())
        assert result["benchmarks"]["synthetic"]["n"] == 4 and result["alp"]
        preds[name] = [
            json.loads(line)["completion"] for line in (out / "predictions.jsonl").read_text().splitlines()
        ]
    assert preds["adapter"] == preds["merged"]  # greedy decoding of the same weights


@pytest.mark.slow  # the two runs: ~2 min on 2 cores
def test_readers_resolve_adapter_stages(runs: dict[str, Path]) -> None:
    run = runs["adapter"]
    assert resolve_model_dir(run) == str(run / "model")
    assert resolve_model_dir(run / "stages" / "0") == str(run / "stages" / "0")
    with pytest.raises(ValueError, match="adapter stage .* save.merged=true"):
        full_model_only(str(run / "model"), "vLLM")
    with full_model_dir(run / "model") as full:
        assert (Path(full) / "config.json").is_file() and (Path(full) / "tokenizer.json").is_file()
        copy, chained = load_model(full).state_dict(), load_model(str(run / "model")).state_dict()
        for k in chained:
            scale = float(chained[k].abs().max()) or 1.0  # float32 merges add in another order per CPU
            torch.testing.assert_close(copy[k].double(), chained[k].double(), rtol=1e-5, atol=1e-6 * scale)
    assert not Path(full).exists()  # the merged copy is temporary
    with _loadable(str(run / "model"), "vllm") as for_vllm, _loadable(str(run / "model"), "hf") as for_hf:
        assert (Path(for_vllm) / "config.json").is_file() and for_hf == str(run / "model")
    assert architecture_dir(run / "stages" / "1") == resolve_model_path(None)  # PPO's vLLM engine
    stage0, stage1 = model_identity(run / "stages" / "0"), model_identity(run / "stages" / "1")
    assert stage0 != stage1 and stage0 == model_identity(run / "stages" / "0")


def test_a_broken_chain_is_refused_naming_the_file(tmp_path: Path) -> None:
    stage = tmp_path / "run" / "stages" / "1"
    stage.mkdir(parents=True)
    (stage / CHAIN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{CHAIN_FILE}: not JSON"):
        load_model(str(stage))
    (stage / CHAIN_FILE).write_text(
        json.dumps({"format": 1, "base": "b", "base_in_run": False, "adapters": 3})
    )
    with pytest.raises(ValueError, match="'adapters' must be a list"):
        resolve_chain(stage)
    chain = AdapterChain(resolve_model_path(None), adapters=("stages/0/adapter",))
    (stage / CHAIN_FILE).write_text(chain.to_json())
    with pytest.raises(FileNotFoundError, match="stages/0/adapter, which is missing"):
        load_model(str(stage))


def test_the_final_link_targets_only_stage_models(tmp_path: Path) -> None:
    store = Store(tmp_path)
    link_final_model(store, "stages/2")
    assert os.readlink(tmp_path / "model") == os.path.join("stages", "2")
    with pytest.raises(ValueError, match="not stages/<i>/model or stages/<i>"):
        link_final_model(store, "../elsewhere")
