"""Helpers for the multi-node, fault and autoscaling tests: run sweeps against a :class:`LocalCluster`.

Everything Ray-side runs in subprocesses (``revmix launch``, or a ``revmix sweep`` driver joined with
``RAY_ADDRESS``) and everything the test reads comes from files and the dashboard's HTTP API, so the test
process never calls ``ray.init`` and never meets the session fixture's Ray instance.

Which node ran a trial: on one machine every node has the same IP and hostname, so Tune's ``node_ip`` says
nothing. A trial attempt is a Tune actor; Tune writes the actor's ``pid`` into every line of the trial's
``result.json``, and the GCS (state API) keeps each actor's ``pid`` and ``node_id`` after it dies. Joining
the two gives the node of every attempt, including an attempt whose node was killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.cluster.harness import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SWEEP = ROOT / "configs" / "sweeps" / "cluster_smoke.yaml"
# Evaluation is wired by another engineer; until its hooks exist the smoke sweep runs with eval off.
EVAL = importlib.util.find_spec("revmix.platform.evaluation.hooks") is not None

T = TypeVar("T")


def smoke_sweep(tmp: Path, overrides: dict[str, Any] | None = None, **top: Any) -> Path:
    """``configs/sweeps/cluster_smoke.yaml`` itself, or a variant of it written into ``tmp``.

    ``overrides`` are merged into the file's ``overrides``; other keyword arguments replace top-level keys
    (``space``, ``resources``...). The variant's ``base`` is made absolute so it resolves from ``tmp``.
    """
    if not overrides and not top and EVAL:
        return SMOKE_SWEEP
    raw = yaml.safe_load(SMOKE_SWEEP.read_text())
    raw["base"] = str((SMOKE_SWEEP.parent / raw["base"]).resolve())
    raw["overrides"] = {**raw["overrides"], **(overrides or {})}
    raw.update(top)
    if not EVAL:
        raw["eval"] = False
    path = tmp / f"{raw['name']}-{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def client_env(cluster: LocalCluster) -> dict[str, str]:
    """This process's environment with the cluster's token and nothing that points at another cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["RAY_AUTH_TOKEN"] = cluster.token
    return env


def launch_sweep(cluster: LocalCluster, sweep: Path, out: Path, log: Path) -> subprocess.Popen:
    """``revmix launch --address DASHBOARD -- revmix sweep SWEEP --out OUT --no-report``, output to ``log``.

    Run from the repository root: ``working_dir`` is the project, as for a user.
    """
    cmd = [sys.executable, "-m", "revmix.cli", "launch", "--address", cluster.address, "--"]
    cmd += ["revmix", "sweep", str(sweep), "--out", str(out), "--no-report"]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=client_env(cluster), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def driver_sweep(cluster: LocalCluster, sweep: Path, out: Path, log: Path) -> subprocess.Popen:
    """``revmix sweep`` as a driver on this machine joined to the cluster (``RAY_ADDRESS`` = its GCS)."""
    env = {**cluster.node_env(), "RAY_ADDRESS": cluster.gcs_address}
    cmd = [sys.executable, "-m", "revmix.cli", "sweep", str(sweep), "--out", str(out), "--no-report"]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait for ``proc``; on timeout kill it (it is ours) and fail."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[:6]} still running after {timeout_s:.0f} s") from None


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Poll ``predicate`` until it returns something truthy; that value. AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def result_lines(out: Path, trial_id: str) -> list[dict[str, Any]]:
    """Tune's per-trial ``result.json`` records (one per report); a line cut mid-write is skipped."""
    path = out / "tune" / trial_id / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def logged_steps(out: Path, trial_id: str) -> list[int]:
    """The ``step`` of every record the trial's run has logged so far (one line per step, unbuffered)."""
    path = out / "trials" / trial_id / "run" / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError):  # a line cut by a kill
            continue
    return steps


def cwd_name(pid: int) -> str | None:
    """Last component of a process's working directory (``None`` if it is gone or not ours)."""
    import psutil

    try:
        return Path(psutil.Process(pid).cwd()).name
    except psutil.Error:
        return None


def trial_ids(out: Path) -> list[str]:
    """Trials the sweep has started (the runner makes ``trials/<id>/`` first thing in a trial)."""
    return sorted(p.name for p in (out / "trials").iterdir()) if (out / "trials").is_dir() else []


def actor_nodes(cluster: LocalCluster) -> dict[int, str]:
    """pid → node id of every actor the GCS knows, dead ones included."""
    rows = cluster.get("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    return {int(a["pid"]): a["node_id"] for a in rows if a.get("pid") and a.get("node_id")}


def attempt_nodes(cluster: LocalCluster, out: Path) -> dict[str, list[str]]:
    """trial id → node ids of its attempts in order (an attempt that never reported is not seen)."""
    where = actor_nodes(cluster)
    found: dict[str, list[str]] = {}
    for trial in trial_ids(out):
        nodes: list[str] = []
        for rec in result_lines(out, trial):
            pid = rec.get("pid")
            if pid is None or int(pid) not in where:
                raise AssertionError(
                    f"trial {trial}: actor pid {pid} unknown to the GCS ({len(where)} actors)"
                )
            node = where[int(pid)]
            if not nodes or nodes[-1] != node:
                nodes.append(node)
        found[trial] = nodes
    return found


def read_results(out: Path) -> list[dict[str, Any]]:
    """``results.csv`` rows (the runner writes it after every trial ended)."""
    import pandas as pd

    return pd.read_csv(out / "results.csv").to_dict("records")


def check_node_column(rows: list[dict[str, Any]], attempts: dict[str, list[str]]) -> None:
    """When the runner records ``node_id`` per trial, it must be the node of the trial's last attempt."""
    for row in rows:
        if "node_id" in row:
            assert row["node_id"] == attempts[row["trial_id"]][-1], (row["trial_id"], row["node_id"])
