"""The pieces of ``benchmarks/memory_scaling.py`` that decide what it measures: its "chunked off" stand-in
equals the chunked log-probs (values, statistics and gradients), rows are as wide as the case says, and
the ratios pair each case with its own ``off``, the host-memory setting each case runs with, and the
heap peaks one case reports."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from revmix.objectives.base import LOGP_CHUNK_TOKENS, _ChunkedTargetLogps
from revmix.platform.host_memory import heap_bytes as glibc_heap

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_scaling.py"


@pytest.fixture(scope="module")
def ms() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memory_scaling", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stats", [False, True])
def test_plain_stand_in_equals_the_chunked_log_probs(ms: ModuleType, stats: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)  # both compute in float32
    targets = torch.randint(0, 11, (2, 6))  # T = 7 >= L = 6: the last position is not scored
    outs = {}
    for name, fn in (("plain", ms.PlainTargetLogps), ("chunked", _ChunkedTargetLogps)):
        x = logits.clone().requires_grad_(True)
        values = fn.apply(x, targets, 0.7, 4 if name == "chunked" else LOGP_CHUNK_TOKENS, stats)
        sum(v.sum() * (k + 1) for k, v in enumerate(values)).backward()
        outs[name] = ([v.detach() for v in values], x.grad)
    for a, b in zip(outs["plain"][0], outs["chunked"][0], strict=True):  # tolerances scale with the values
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * (float(a.abs().max()) or 1.0))
    grad = outs["plain"][1]
    torch.testing.assert_close(
        grad, outs["chunked"][1], rtol=1e-5, atol=1e-6 * (float(grad.abs().max()) or 1.0)
    )


def test_rows_and_ratios(ms: ModuleType) -> None:
    rows = ms.synthetic_rows(3, 300, pairs=True, seed=1)
    widths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    assert widths[0] == 300 and all(8 <= w <= 300 for w in widths)
    assert all(len(r["prompt_ids"]) + len(r["other_ids"]) <= 300 for r in rows)
    results = {
        "base:sft:512:off": {"extra_gib": 2.0, "peak_gib": 4.0, "tokens_per_s": 10.0},
        "base:sft:512:packing": {"extra_gib": 1.0, "peak_gib": 3.0, "tokens_per_s": 15.0},
        "base:sft:1024:packing": {
            "extra_gib": 1.0,
            "peak_gib": 3.0,
            "tokens_per_s": 15.0,
        },  # no off: no ratio
    }
    assert ms.ratios(results) == {
        "base:sft:512:packing": {"extra_over_off": 0.5, "peak_over_off": 0.75, "tokens_per_s_over_off": 1.5}
    }
    assert ("qwen2.5-0.5b", "sft", 512, "packing") not in ms.plan(["qwen2.5-0.5b"], [512], full=True)
    assert len(ms.plan(["base"], [512, 1024], full=False)) == 2 * (4 + 2)


def test_release_host_memory_follows_checkpointing_unless_the_case_says(ms: ModuleType) -> None:
    glibc = glibc_heap() is not None
    assert ms.release_setting(()) is False
    assert ms.release_setting(("chunked",)) is False
    assert ms.release_setting(("ckpt", "chunked")) is glibc  # auto, as the stage worker resolves it on CPU
    assert ms.release_setting(ms.CASES["sft"]["ckpt+chunked+hold"]) is False
    if glibc:
        assert ms.release_setting(ms.CASES["dpo"]["off+release"]) is True


@pytest.mark.skipif(glibc_heap() is None, reason="heap peaks need glibc 2.33+ (mallinfo2)")
def test_one_case_reports_the_heap_peaks_it_ran_with() -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--case",
        "base:sft:96:ckpt+chunked",
        "--steps",
        "0",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["release_host_memory"] is True and math.isfinite(r["loss"])
    assert 0 < r["heap_in_use_gib"] <= r["heap_held_gib"] + 1e-3  # held counts every block in use
