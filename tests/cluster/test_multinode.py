"""A sweep on a real two-node Ray cluster on one machine, submitted with ``revmix launch``; then a node dies.

The cluster (:class:`tests.cluster.harness.LocalCluster`: a head and a ``worker`` node, one CPU each, token
auth, every node its own ``ray start --block`` session) is shared by the module's tests. A smoke
trial needs one CPU (``num_workers: 0``, ``resources: {cpu: 1}``), so two concurrent trials cannot share a
node: they must land one on each. The sweep directory is a local path, which every node sees because all
nodes are on this machine (on a real cluster it must be shared storage).

Node death is detected by the GCS health check; the module's cluster checks every second and declares a
node dead after 5 missed checks (~5 s) instead of Ray's default ~17 s, so the fault test stays short.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster_utils import (
    ROOT,
    attempt_nodes,
    check_node_column,
    cwd_name,
    finish,
    launch_sweep,
    logged_steps,
    read_results,
    smoke_sweep,
    tail,
    trial_ids,
    wait_for,
)
from tests.cluster.harness import LocalCluster, cmdline_names_dir

FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(head_cpus=1, env=FAST_HEALTH_CHECKS) as c:
        c.add_node(num_cpus=1, name="worker")
        yield c


def _node(cluster: LocalCluster, name: str) -> str:
    (node,) = [w for w in cluster.workers if w.name == name]
    assert node.node_id
    return node.node_id


def test_process_matching_respects_directory_boundaries() -> None:
    """A node's stragglers are found by its temp dir: ``/x/n1`` must not match ``/x/n10``'s processes."""
    assert cmdline_names_dir(["raylet", "--temp-dir=/tmp/rmxcab/n1_worker"], "/tmp/rmxcab/n1_worker")
    assert cmdline_names_dir(
        ["python", "--logs-dir=/tmp/rmxcab/n1_worker/session_x/logs"], "/tmp/rmxcab/n1_worker"
    )
    assert not cmdline_names_dir(["raylet", "--temp-dir=/tmp/rmxcab/n1_worker2"], "/tmp/rmxcab/n1_worker")
    assert not cmdline_names_dir(["ray::trial_fn"], "/tmp/rmxcab/n1_worker")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_launched_sweep_runs_trials_on_both_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    sweep = smoke_sweep(tmp_path)
    if sweep.is_relative_to(ROOT):  # as a user types it: resolved inside the shipped working_dir
        sweep = sweep.relative_to(ROOT)
    out, log = tmp_path / "sweep", tmp_path / "launch.log"
    t0 = time.monotonic()
    rc = finish(launch_sweep(cluster, sweep, out, log), timeout_s=150)
    assert rc == 0, tail(log)
    assert " SUCCEEDED" in tail(log, 300)

    rows = read_results(out)
    assert sorted(r["stages.0.mix.reverse_fraction"] for r in rows) == [0.0, 1.0]
    for r in rows:
        assert r["status"] == "TERMINATED" and r["train/steps"] == 4 and math.isfinite(r["final/loss"]), r
    attempts = attempt_nodes(cluster, out)
    assert sorted(attempts) == sorted(r["trial_id"] for r in rows)
    assert all(len(nodes) == 1 for nodes in attempts.values()), attempts  # no retries
    used = {nodes[0] for nodes in attempts.values()}
    assert used == {cluster.head.node_id, _node(cluster, "worker")}, (used, cluster.node_names())
    check_node_column(rows, attempts)
    print(f"two-node sweep: {time.monotonic() - t0:.1f} s")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_losing_a_node_mid_sweep_retries_its_trial_and_keeps_every_result(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Three 1-CPU trials on three 1-CPU nodes; SIGKILL the node of one while it trains.

    Tune's FailureConfig (max_failures=1) retries that trial once a CPU frees up on a surviving node; the
    retry resumes from the run's last checkpoint. The head and ``worker`` survive, so everything still fits.
    """
    doomed = cluster.add_node(num_cpus=1, name="doomed")
    steps = 40
    sweep = smoke_sweep(
        tmp_path,
        {"stages.0.steps": steps, "stages.0.checkpoint_every": 4},
        space={"stages.0.mix.reverse_fraction": {"grid": [0.0, 0.5, 1.0]}},
    )
    out, log = tmp_path / "sweep", tmp_path / "launch.log"
    t0 = time.monotonic()
    proc = launch_sweep(cluster, sweep, out, log)
    try:

        def trial_training_on_doomed_node() -> str | None:
            # Fast local checks, so a poll catches the trial mid-training: Tune runs a trial with its cwd
            # in the trial's working dir (named by trial id), and the run logs every step to metrics.jsonl.
            for trial in {cwd_name(pid) for pid in doomed.pids()} & set(trial_ids(out)):
                done = len(logged_steps(out, trial))
                if done >= steps // 2:  # fail now rather than wait out the timeout
                    raise AssertionError(f"{trial} reached step {done}/{steps} before it could be killed")
                if done >= 5:  # past its first checkpoint (step 4)
                    return trial
            return None

        victim = wait_for(trial_training_on_doomed_node, 120, "a trial training on the doomed node", 0.2)
        cluster.kill_node(doomed)  # SIGKILL: raylet, agents and the trial's actor die at once
        t_kill = time.monotonic() - t0
        rc = finish(proc, timeout_s=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, tail(log)

    rows = read_results(out)
    assert len(rows) == 3 and sorted(r["stages.0.mix.reverse_fraction"] for r in rows) == [0.0, 0.5, 1.0]
    for r in rows:  # nothing lost: every trial has its row, complete, none marked failed
        assert r["status"] == "TERMINATED" and r["train/steps"] == steps, r
        assert math.isfinite(r["final/loss"]) and not isinstance(r["error"], str), r

    attempts = attempt_nodes(cluster, out)
    survivors = {cluster.head.node_id, _node(cluster, "worker")}
    assert attempts[victim][0] == doomed.node_id and len(attempts[victim]) == 2, attempts
    assert attempts[victim][1] in survivors
    for trial, nodes in attempts.items():
        meta = json.loads((out / "trials" / trial / "trial.json").read_text())
        assert meta["attempts"] == (2 if trial == victim else 1), (trial, meta)
        if trial != victim:
            assert len(nodes) == 1 and nodes[0] in survivors
    # the retry resumed from the run's last checkpoint (one every 4 steps), not from step 0, and the steps
    # it ran again replaced their first records in metrics.jsonl (one record per step)
    result = json.loads((out / "trials" / victim / "run" / "stages" / "0" / "result.json").read_text())
    assert result["start_step"] > 0 and result["start_step"] % 4 == 0, result
    assert logged_steps(out, victim) == list(range(1, steps + 1))
    check_node_column(rows, attempts)
    print(f"fault sweep: kill at {t_kill:.1f} s, done at {time.monotonic() - t0:.1f} s")
