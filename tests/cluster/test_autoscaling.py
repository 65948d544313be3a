"""Autoscaling on one machine: a sweep's demand brings worker nodes up from zero; idle ones are released.

The cluster runs Ray's ``fake_multinode`` provider (:func:`tests.cluster.harness.fake_autoscaling_config`):
a head with no CPUs, and a ``cpu`` worker type (1 CPU, 0 to 2 nodes, idle timeout 9 s) whose nodes the
autoscaler starts as local processes. The smoke sweep's two 1-CPU trials are demand the head cannot meet.

The sweep runs as a driver joined with ``RAY_ADDRESS`` rather than through ``revmix launch``: the fake
provider starts its workers in the head's temp dir, so their runtime-env agents share the head's
``runtime_resources/`` and re-extract a job's ``working_dir`` over the one the job's driver is running in
(``FileNotFoundError`` from ``os.getcwd`` in Tune). A real cluster's nodes each have their own disk.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from tests.cluster.cluster_utils import (
    attempt_nodes,
    check_node_column,
    driver_sweep,
    read_results,
    smoke_sweep,
    tail,
    wait_for,
)
from tests.cluster.harness import (
    FAKE_HEAD_NODE_ID,
    LocalCluster,
    fake_autoscaling_config,
    parse_active_nodes,
)

STATUS = """======== Autoscaler status: 2026-11-26 13:59:15.292482 ========
Node status
---------------------------------------------------------------
Active:
 1 ray.head.default
 2 cpu
Pending:
 1 cpu, 1 launching
Recent failures:
 (no failures)
"""


def test_fake_autoscaling_config_is_a_valid_launcher_config() -> None:
    """Ray's own schema and ``validate_config`` (what ``ray up``/the monitor run) accept it offline."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    from revmix.cluster.validate import ray_launcher_schema

    cfg = fake_autoscaling_config(worker_cpus=2, max_workers=3, idle_timeout_minutes=0.5)
    cfg["provider"]["gcs_address"] = "127.0.0.1:6379"
    jsonschema.validate(cfg, ray_launcher_schema())
    validate_config(cfg)
    assert cfg["head_node_type"] == "ray.head.default" == list(cfg["available_node_types"])[0]
    assert cfg["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
    worker = cfg["available_node_types"]["cpu"]
    assert (worker["min_workers"], worker["max_workers"], worker["resources"]["CPU"]) == (0, 3, 2)
    provider = cfg["provider"]
    assert provider["disable_node_updaters"] and provider["disable_launch_config_check"]
    assert provider["use_node_id_as_ip"] and cfg["auth"]["ssh_user"]


def test_parse_active_nodes_reads_only_the_active_section() -> None:
    assert parse_active_nodes(STATUS) == {"ray.head.default": 1, "cpu": 2}  # pending ones not counted
    assert parse_active_nodes("No cluster status. It may take a few seconds ...") == {}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_sweep_demand_scales_workers_up_from_zero_and_idle_workers_are_released(tmp_path: Path) -> None:
    config = fake_autoscaling_config(worker_cpus=1, max_workers=2, idle_timeout_minutes=0.15)
    t0 = time.monotonic()
    # the autoscaler's loop every second instead of every 5 s
    with LocalCluster(autoscaling=config, env={"AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as cluster:
        (head,) = cluster.nodes()
        assert head["node_id"] == FAKE_HEAD_NODE_ID and head["resources_total"].get("CPU", 0) == 0
        wait_for(lambda: cluster.active_node_types() == {"ray.head.default": 1}, 30, "the autoscaler's view")

        out, log = tmp_path / "sweep", tmp_path / "driver.log"
        proc = driver_sweep(cluster, smoke_sweep(tmp_path), out, log)
        seen: set[str] = set()
        peak: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 180
            while proc.poll() is None:
                seen |= {n["node_id"] for n in cluster.nodes()}
                active = cluster.active_node_types()
                if active.get("cpu", 0) > peak.get("cpu", 0):
                    peak = active
                assert time.monotonic() < deadline, "sweep still running after 180 s:\n" + tail(log)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        t_sweep = time.monotonic() - t0
        assert proc.returncode == 0, tail(log)

        workers = seen - {FAKE_HEAD_NODE_ID}
        assert 1 <= len(workers) <= 2, seen  # scaled up from zero, never past max_workers
        assert 1 <= peak.get("cpu", 0) <= 2 and peak.get("ray.head.default") == 1, peak
        rows = read_results(out)
        assert len(rows) == 2
        for r in rows:
            assert r["status"] == "TERMINATED" and math.isfinite(r["final/loss"]), r
        attempts = attempt_nodes(cluster, out)
        assert all(len(n) == 1 and n[0] in workers for n in attempts.values()), (attempts, workers)
        check_node_column(rows, attempts)

        # released when idle: the GCS sees only the head alive, the autoscaler counts no workers
        wait_for(lambda: len(cluster.nodes()) == 1, 60, "idle worker nodes to be terminated")
        states = {n["node_id"]: n["state"] for n in cluster.nodes(alive_only=False)}
        assert all(states[w] == "DEAD" for w in workers), states
        wait_for(lambda: cluster.active_node_types() == {"ray.head.default": 1}, 30, "autoscaler: no workers")
        print(f"autoscaling: sweep done at {t_sweep:.1f} s, scaled down at {time.monotonic() - t0:.1f} s")
