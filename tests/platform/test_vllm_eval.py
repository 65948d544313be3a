"""Stage-end evaluation through Ray Data LLM (vLLM) inside a run: a tiny SFT → DPO run with 3 samples per
item reports mean accuracy, pass@k and maj@k per benchmark × direction, and the sweep table's names.

Skipped where vLLM is not installed (the core venv); CI's `.venv-vllm` (docs/vllm_cpu.md) runs it. Each
stage's evaluation starts its own engine, which dominates the time (250 s per stage measured on the shared
2-core machine at load average ~7; 450–610 s for the whole test there at load 7–55), so the run is as
small as a run can be.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from revmix.config import load_config  # noqa: E402
from revmix.sweeps.results import flatten_summary  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow]
SAMPLES = 3


def test_sft_then_dpo_stage_end_eval_runs_on_ray_data_llm(ray_local, tmp_path) -> None:
    from revmix.platform.train import run_experiment

    cfg = load_config(
        "configs/runs/sft_then_dpo_tiny.yaml",
        [
            "data.n_items=40",
            "stages.0.steps=2",
            "stages.1.steps=2",
            "eval.generator=vllm",
            f"eval.samples={SAMPLES}",
            "eval.temperature=1.0",
            "eval.max_new_tokens=8",
            "eval.limit=4",
            "eval.alp_limit=2",
        ],
    )
    summary = run_experiment(cfg, tmp_path / "run")
    for i, stage in enumerate(summary["stages"]):
        ev = stage["eval"]
        assert ev["generator"] == "vllm" and "pending" not in ev, f"stage {i}"
        bench = ev["benchmarks"]["synthetic"]
        assert (bench["n"], bench["samples"]) == (4, SAMPLES)
        for part in (bench, *bench["by_direction"].values()):
            assert sorted(k for k in part if "@" in k) == ["maj@1", "maj@3", "pass@1", "pass@3"]
            assert all(0.0 <= part[k] <= 1.0 for k in part if "@" in k)
            assert part["pass@1"] == pytest.approx(part["accuracy"])  # pass@1 is the mean over samples
            assert part["pass@3"] >= part["pass@1"]
        assert {d: b["n"] for d, b in bench["by_direction"].items()} == {"forward": 2, "reverse": 2}
        assert set(ev["alp"]) == {"forward", "reverse"}  # ALP from rank 0's live policy, kept
        on_disk = json.loads((tmp_path / "run" / "stages" / str(i) / "result.json").read_text())
        assert on_disk["eval"] == ev  # the driver wrote the completed evaluation back
    flat = flatten_summary(summary)
    for name in ("eval/accuracy/synthetic", "eval/pass@3/synthetic", "eval/maj@3/synthetic/reverse"):
        assert name in flat
    assert "stage0/eval/pass@3/synthetic/forward" in flat
