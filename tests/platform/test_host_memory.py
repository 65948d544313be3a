"""``runtime.release_host_memory``: how the setting resolves, and what it does to glibc's heap — each
allocation pattern in a fresh process, since the setting and glibc's dynamic threshold are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revmix.config import RuntimeConfig
from revmix.platform import host_memory as H
from revmix.platform.recipe import host_memory_release

SRC = str(Path(H.__file__).resolve().parents[2])
MIB = 2**20
needs_glibc = pytest.mark.skipif(H.heap_bytes() is None, reason="needs glibc 2.33+ (mallopt, mallinfo2)")

# An 8 MiB block is freed (glibc's dynamic threshold then rises above 8 MiB), then six times an 8 MiB
# block is allocated, a small block that stays alive after it, and the 8 MiB block freed. Under the
# dynamic rule the 8 MiB blocks are heap blocks below the small ones, so the last one's space stays held
# by the heap; released, each is its own mapping, unmapped when freed. Last, one 8 MiB block is held alive
# to see where it lies. The pattern runs inside the setting, then again after it.
PATTERN = """
import json, sys
import torch
from revmix.platform import host_memory as H

def free_left_by_pattern():
    before = H.heap_bytes()
    torch.empty(2 * 2**20)  # allocated and freed at once
    keep = []
    for _ in range(6):
        big = torch.ones(2 * 2**20)
        keep.append(torch.ones(64))
        del big
    after = H.heap_bytes()
    live = torch.ones(2 * 2**20)  # an 8 MiB block alive: its own mapping, or a heap block?
    mapped = H.heap_bytes()["mapped"] - after["mapped"]
    del live
    return {
        "free": after["free"] - before["free"],
        "in_use": after["in_use"] - before["in_use"],
        "mapped_live": mapped,
    }, keep

with H.released_host_memory(sys.argv[1] == "on"):
    inside, kept = free_left_by_pattern()
after_exit, kept_too = free_left_by_pattern()
print(json.dumps({"inside": inside, "after_exit": after_exit}))
"""


def _heap_after_pattern(on: bool) -> dict[str, dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)  # either would turn glibc's dynamic rule off from the start
    done = subprocess.run(
        [sys.executable, "-c", PATTERN, "on" if on else "off"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_released_blocks_leave_no_free_space_held_by_the_heap_until_the_setting_ends():
    held = _heap_after_pattern(on=False)
    released = _heap_after_pattern(on=True)
    assert held["inside"]["free"] >= 8 * MIB, held  # the dynamic rule keeps a freed 8 MiB block
    assert released["inside"]["free"] < 1 * MIB, released  # released: the freed blocks are unmapped
    # The same blocks are alive either way: only where freed space goes differs.
    assert abs(released["inside"]["in_use"] - held["inside"]["in_use"]) < 1 * MIB
    # An 8 MiB block has its own mapping inside the setting; after it (a fixed 32 MiB threshold) it is a
    # heap block again. (Whether a freed one then stays as heap free space depends on where it lies: glibc
    # trims a free top of the heap, so that is not asserted.)
    assert released["inside"]["mapped_live"] >= 8 * MIB, released
    assert released["after_exit"]["mapped_live"] < 1 * MIB, released


def test_auto_releases_with_checkpointing_on_cpu_only(monkeypatch):
    assert H.release_wanted("off", "cpu", True) is False
    assert H.release_wanted("auto", "cpu", False) is False
    assert H.release_wanted("auto", "cuda", True) is False
    assert H.release_wanted("auto", "cpu", True) is (H.glibc() is not None)
    with pytest.raises(ValueError, match="unknown release_host_memory 'yes'; valid: auto, on, off"):
        H.release_wanted("yes", "cpu", True)
    monkeypatch.setattr(H, "glibc", lambda: None)  # as on macOS or musl
    assert H.release_wanted("auto", "cpu", True) is False
    with pytest.raises(RuntimeError, match="not glibc; set it to auto or off"):
        H.release_wanted("on", "cpu", False)
    with H.released_host_memory(False) as on:  # off needs no glibc
        assert on is False


@needs_glibc
@pytest.mark.parametrize(
    ("checkpointing", "release", "expected"),
    [
        ("on", "auto", True),
        ("auto", "auto", False),
        ("off", "auto", False),
        ("off", "on", True),
        ("on", "off", False),
    ],
)
def test_a_cpu_stage_worker_resolves_the_runtime_settings(checkpointing, release, expected):
    runtime = RuntimeConfig(activation_checkpointing=checkpointing, release_host_memory=release)
    assert host_memory_release(runtime, use_gpu=False) is expected
    # use_gpu without a visible GPU trains on CPU; with one, auto leaves host memory alone
    on_gpu = torch.cuda.is_available() and release == "auto"
    assert host_memory_release(runtime, use_gpu=True) is (False if on_gpu else expected)


def test_yaml_on_off_are_read_as_words():
    assert RuntimeConfig.model_validate({"release_host_memory": True}).release_host_memory == "on"
    assert RuntimeConfig.model_validate({"release_host_memory": False}).release_host_memory == "off"


@needs_glibc
def test_a_run_with_checkpointing_on_cpu_releases_host_memory_for_its_stage_only(tmp_path, capsys):
    from revmix.config import load_config
    from revmix.platform.train import run_experiment

    sft = Path(__file__).resolve().parents[2] / "configs" / "runs" / "sft_tiny.yaml"
    short = [
        "data.n_items=16",
        "stages.0.batch_size=4",
        "stages.0.steps=2",
        "eval.limit=2",
        "eval.alp_limit=2",
    ]
    line = "host memory: freed blocks of 128 KiB or more go back to the OS (runtime.release_host_memory)"
    run_experiment(load_config(sft, short), tmp_path / "default", evaluate=False)
    assert line not in capsys.readouterr().out  # CPU, checkpointing off: the allocator as it is
    cfg = load_config(sft, [*short, "runtime.activation_checkpointing=on"])
    run_experiment(cfg, tmp_path / "ckpt", evaluate=False)
    assert capsys.readouterr().out.count(line) == 1
    # The stage is over: glibc's threshold is 32 MiB again, so an 8 MiB block is a heap block, not a mapping.
    # (Whether a block inside the setting is a fresh mapping depends on the holes this process's heap already
    # has, so that side is checked in a fresh process above, not here.)
    mapped = H.heap_bytes()["mapped"]
    block = torch.ones(2 * 2**20)
    assert H.heap_bytes()["mapped"] - mapped < 1 * MIB
    del block
