"""A multi-node Ray cluster on one machine: a head and extra nodes, each its own ``ray start --block``.

    from tests.cluster.harness import LocalCluster, fake_autoscaling_config

    with LocalCluster(head_cpus=1) as c:              # ray start --head --block, token auth on
        worker = c.add_node(num_cpus=1)               # ray start --address ... --block
        ...  revmix launch --address c.address ...    # with RAY_AUTH_TOKEN=c.token
        c.kill_node(worker)                           # a node crash: SIGKILL, all its processes at once

    with LocalCluster(autoscaling=fake_autoscaling_config(max_workers=2)) as c:
        ...                                           # worker nodes come and go with demand

Why a real multi-process cluster rather than ``ray.cluster_utils.Cluster``: the latter lives inside the
calling process (its ``ray.init`` clashes with any other Ray state there) and ``AutoscalingCluster`` is
unusable from the wheel (it reads a file the wheel does not ship and runs the CLI's forced stop command). Here every
node is ``ray start ... --block`` in a session of its own with its own ``--temp-dir`` and free ports (GCS,
dashboard, agents, metrics), so several clusters — and other people's Ray — coexist on one machine, and a
node is removed as a machine would vanish: by killing its processes. Nothing here runs the Ray CLI's stop command, which
kills every Ray process of the user. Every node dies with the process that started it, even when that process
is killed with SIGKILL (a test run stopped hard): see :func:`die_with_parent`.

Addresses (ray 2.60): the dashboard binds 127.0.0.1 (``--dashboard-host``), but Ray's gRPC servers (GCS,
raylet) listen on all interfaces whatever ``--node-ip-address`` says, and ``ray start`` rewrites
``--node-ip-address 127.0.0.1`` to the host's interface address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` — which in turn makes ``ray start --address`` refuse to add a
node. So the nodes of a plain cluster all report the host's IP, and are told apart by node id and by the
``revmix.local/node`` label given here. :meth:`LocalCluster.nodes` reads the GCS's view through the
dashboard's state API with the cluster's token, so a caller never needs ``ray.init`` in its own process.

Fake autoscaling (``autoscaling=``) uses Ray's ``fake_multinode`` provider, which starts worker nodes as
local processes from inside the head's autoscaler. What it needs in ray 2.60, found by running it (the
plain provider recipe in docs/cluster.md alone does not scale up): the head node type is named ``ray.head.default``; the
provider sets ``disable_node_updaters``, ``disable_launch_config_check`` and ``use_node_id_as_ip``; the head
runs with ``RAY_FAKE_CLUSTER=1`` and ``RAY_OVERRIDE_NODE_ID_FOR_TESTING`` = the provider's fixed head id; the
config has ``auth.ssh_user``; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` on the head and on drivers keeps the
fake workers (and the driver's raylet lookup) on 127.0.0.1; autoscaler v1 (v2 fails from the wheel). The fake
workers share the head's temp dir, hence its ``runtime_resources/``: a Ray *job* with a ``working_dir``
breaks there (a worker's runtime-env agent re-extracts the package over the directory the job's driver is
running in), so drive a fake cluster from a driver joined with ``RAY_ADDRESS=<gcs_address>``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NODE_LABEL = "revmix.local/node"
HEAD_NAME = "head"
# The fake provider hard-codes its head's node id (ray/autoscaler/_private/fake_multi_node/node_provider.py).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
FAKE_HEAD_NODE_TYPE = "ray.head.default"


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LocalClusterError(RuntimeError):
    """A node did not start (the message carries the tail of its log) or the cluster API failed."""


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` after which the child gets SIGKILL as soon as the calling process dies (Linux).

    Teardown in ``__exit__``/``finally`` does not run when pytest itself is killed (``kill -9``, a CI
    time-out), and a ``ray start --head --block`` left behind holds ports, memory and CPUs for good.
    ``prctl(PR_SET_PDEATHSIG)`` is kept by the kernel, so it covers every way of dying; Ray's own reaper
    then takes the node's raylet, GCS and workers down with it. The signal follows the *thread* that
    started the child, so start nodes from a thread that lives as long as the cluster (the main thread).
    If this process dies between the fork and the ``prctl``, the child sees a new parent and kills itself.
    """
    if not sys.platform.startswith("linux"):
        raise LocalClusterError("the local cluster harness needs Linux (prctl PR_SET_PDEATHSIG)")
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child must not dlopen after fork
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` with its output in ``log``, in a session of its own, dying with this process."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_head_command(ports: list[int], num_cpus: str, temp_dir: Path, extra: list[str]) -> list[str]:
    """``ray start --head --block`` on 127.0.0.1 with every port given (seven, from :func:`free_ports`):
    nothing listens on a default port another test or user may hold."""
    gcs, dash, agent, agent_grpc, runtime_env, metrics, client = ports
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client),
        "--num-cpus", num_cpus, "--num-gpus", "0", "--temp-dir", str(temp_dir),
        "--include-dashboard", "true", "--disable-usage-stats", *extra,
    ]  # fmt: skip


def fake_autoscaling_config(
    worker_cpus: int = 1,
    max_workers: int = 2,
    idle_timeout_minutes: float = 0.25,
    head_cpus: int = 0,
    worker_type: str = "cpu",
    object_store_bytes: int = 200 * 1024**2,
) -> dict[str, Any]:
    """A complete launcher config for the ``fake_multinode`` provider; ``gcs_address`` is filled at start.

    Every list and mapping the launcher would otherwise fill from a provider's ``defaults.yaml`` is written
    out (the fake provider has none). ``head_cpus=0``: the head schedules nothing, so any task that needs a
    CPU is demand the autoscaler must meet with a worker node.
    """
    return {
        "cluster_name": "revmix-local",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": None,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "use_node_id_as_ip": True,
        },
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            worker_type: {
                "resources": {"CPU": worker_cpus, "object_store_memory": object_store_bytes},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class LocalNode:
    """One ``ray start --block`` process group; ``node_id`` is the Ray node id once it has registered."""

    name: str
    num_cpus: float
    temp_dir: Path
    log: Path
    process: subprocess.Popen
    node_id: str | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> set[int]:
        """Live processes of this node: its session (see :func:`_kill_nodes`) plus any naming its temp dir."""
        return session_members(self.process.pid) | set(processes_under(self.temp_dir))


def session_members(sid: int) -> set[int]:
    """Pids whose session id is ``sid`` (every descendant of a ``start_new_session`` process that did not
    call ``setsid`` itself)."""
    import psutil

    found = set()
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(p.info["pid"]) == sid:
                found.add(p.info["pid"])
    return found


def cmdline_names_dir(cmdline: list[str], directory: str) -> bool:
    """Whether a command line names ``directory`` itself or a path below it (``/x/n1`` is not ``/x/n10``)."""
    pattern = re.compile(re.escape(directory) + r"(?:$|[/\s'\",])")
    return any(pattern.search(part) for part in cmdline)


def processes_under(directory: Path) -> list[int]:
    """Pids of processes whose command line names ``directory`` (a node's private temp dir)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.info["pid"] != os.getpid() and cmdline_names_dir(p.info["cmdline"] or [], str(directory)):
                mine.append(p.info["pid"])
    return mine


def _kill_nodes(nodes: list[LocalNode], sig: int, grace_s: float) -> None:
    """``sig`` to each node's process group; after ``grace_s``, SIGKILL to the groups, then to the sessions.

    ``ray start --block`` runs in a new session and leads its process group, which holds the raylet, GCS,
    dashboard and agents. Ray puts each *worker* process (tasks, actors, Tune trials) in a process group of
    its own and renames its command line (``ray::trial_fn``), so neither the group nor the temp dir finds
    them; they stay in the node's session, which is how they are found here. Nodes are signalled together
    so a cluster's teardown costs one grace period, not one per node.
    """
    for node in nodes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, sig)
    deadline = time.monotonic() + grace_s
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for node in nodes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=5)
    for node in nodes:
        for pid in session_members(node.process.pid) | set(processes_under(node.temp_dir)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class LocalCluster:
    """A head with token auth, plus nodes added with :meth:`add_node`; see the module doc.

    With ``autoscaling`` (a :func:`fake_autoscaling_config`), the head's CPUs come from the config's head
    node type and ``head_cpus`` is ignored.

    ``env`` is added to every node's environment (``RAY_<flag>`` system settings such as
    ``RAY_health_check_period_ms`` are read by the head's GCS). Use as a context manager: ``__exit__`` kills
    every node it started, even when the body failed.
    """

    head_cpus: float = 1
    head_resources: dict[str, float] = field(default_factory=dict)
    autoscaling: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    object_store_bytes: int = 200 * 1024**2  # per node; Ray's default (30% of RAM) per node adds up
    timeout_s: float = 60.0
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        self.root: Path | None = None
        self.head: LocalNode | None = None
        self.workers: list[LocalNode] = []
        self.address = ""  # dashboard, for the Jobs API: http://127.0.0.1:PORT
        self.gcs_address = ""

    # ------------------------------------------------------------------------------------ life cycle ---

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def node_env(self) -> dict[str, str]:
        """The environment of every node (and what a driver on this machine should use to join)."""
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # the cluster's `python` (job entrypoints) must be this interpreter
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        if self.autoscaling is not None:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node IP = 127.0.0.1, fake workers included
            env["RAY_enable_autoscaler_v2"] = "0"
        env.update(self.env)
        return env

    def start(self) -> None:
        """Start the head and wait for its dashboard; a start that lost a port race is retried twice."""
        self.root = Path(tempfile.mkdtemp(prefix="rmxc", dir="/tmp"))  # short: unix sockets live here
        try:
            for attempt in range(3):
                try:
                    self._start_head()
                    return
                except LocalClusterError as e:
                    if attempt == 2 or ("already in use" not in str(e) and "Failed to start" not in str(e)):
                        raise
        except BaseException:
            self.shutdown()
            raise

    def _start_head(self) -> None:
        assert self.root is not None
        ports = free_ports(7)
        gcs, dash = ports[:2]
        temp_dir = self.root / f"h{gcs}"
        temp_dir.mkdir()
        env = self.node_env()
        cpus = self.head_cpus
        extra: list[str] = []
        if self.autoscaling is not None:
            cfg = copy.deepcopy(self.autoscaling)
            cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
            cpus = cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("CPU", 0)
            cfg_path = temp_dir / "autoscaling.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            extra += ["--autoscaling-config", str(cfg_path)]
            env.update({"RAY_FAKE_CLUSTER": "1", "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
            env.setdefault("AUTOSCALER_METRIC_PORT", str(free_ports(1)[0]))  # default 44217 may be taken
        if self.head_resources:
            extra += ["--resources", json.dumps(self.head_resources)]
        extra += [
            "--object-store-memory",
            str(self.object_store_bytes),
            "--labels",
            f"{NODE_LABEL}={HEAD_NAME}",
        ]
        cmd = ray_head_command(ports, _num(cpus), temp_dir, extra)
        head = self._popen(HEAD_NAME, cpus, temp_dir, cmd, env)
        self.head = head
        self.address, self.gcs_address = f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
        try:
            self._wait(head, lambda: self._dashboard_up() and self._node_id(HEAD_NAME) is not None)
        except BaseException:
            _kill_nodes([head], signal.SIGKILL, 0)
            self.head = None
            raise

    def add_node(
        self, num_cpus: float = 1, resources: dict[str, float] | None = None, name: str | None = None
    ) -> LocalNode:
        """Start one more node on this machine and wait until the GCS reports it alive."""
        if self.head is None or self.root is None:
            raise LocalClusterError("add_node: the cluster is not started (use it as a context manager)")
        if self.autoscaling is not None:
            raise LocalClusterError(
                "add_node: an autoscaling cluster gets its nodes from the autoscaler (and its "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes `ray start --address` refuse to join)"
            )
        name = name or f"node{len(self.workers) + 1}"
        if name == HEAD_NAME or any(w.name == name for w in self.workers):
            raise LocalClusterError(f"add_node: a node named {name!r} already exists")
        agent, agent_grpc, runtime_env, metrics = free_ports(4)
        temp_dir = self.root / f"n{len(self.workers) + 1}_{name}"
        temp_dir.mkdir()
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--block",
            "--address", self.gcs_address, "--node-ip-address", "127.0.0.1",
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--num-cpus", _num(num_cpus), "--num-gpus", "0", "--temp-dir", str(temp_dir),
            "--object-store-memory", str(self.object_store_bytes),
            "--labels", f"{NODE_LABEL}={name}", "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        node = self._popen(name, num_cpus, temp_dir, cmd, self.node_env())
        self.workers.append(node)
        self._wait(node, lambda: self._node_id(name) is not None)
        return node

    def kill_node(self, node: LocalNode, sig: int = signal.SIGKILL, grace_s: float = 10.0) -> None:
        """Take a node away: ``sig`` to its process group (SIGKILL = a crash, SIGTERM = a clean stop)."""
        _kill_nodes([node], sig, grace_s)

    def shutdown(self) -> None:
        """Stop every node this cluster started and remove the temp dirs.

        SIGTERM first, SIGKILL after 2 s: ``ray start --block`` often outlives a SIGTERM to its group
        (measured: 2 of 3 nodes still up after 30 s), so a longer grace only slows every teardown down.
        """
        _kill_nodes([*self.workers, *([self.head] if self.head else [])], signal.SIGTERM, 2.0)
        if self.root is not None:
            for pid in processes_under(self.root):  # fake autoscaler workers, anything else left
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self.root, ignore_errors=True)

    def _popen(self, name: str, cpus: float, temp_dir: Path, cmd: list[str], env: dict) -> LocalNode:
        log = temp_dir / "node.log"
        return LocalNode(name, float(cpus), temp_dir, log, start_process(cmd, env, log))

    def _wait(self, node: LocalNode, ready: Any) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if node.process.poll() is not None or time.monotonic() > deadline:
                text = node.log.read_text(errors="replace")[-3000:] if node.log.exists() else ""
                raise LocalClusterError(
                    f"ray node {node.name!r} did not come up (rc={node.process.poll()}, log {node.log}):\n{text}"
                )
            time.sleep(0.5)
        node.node_id = self._node_id(node.name)

    # ------------------------------------------------------------------------------------- the API ---

    def get(self, path: str, timeout_s: float = 10.0) -> Any:
        """GET ``path`` on the dashboard with the cluster's token; the decoded JSON."""
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise LocalClusterError(f"GET {self.address}{path}: {e}") from None

    def _dashboard_up(self) -> bool:
        try:
            self.get("/api/version", timeout_s=2)
        except LocalClusterError:
            return False
        return True

    def nodes(self, alive_only: bool = True) -> list[dict[str, Any]]:
        """The GCS's nodes (state API): ``node_id``, ``state``, ``labels``, ``resources_total``, ..."""
        data = self.get("/api/v0/nodes?limit=1000&detail=true")
        rows = data["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE" or not alive_only]

    def _node_id(self, name: str) -> str | None:
        try:
            nodes = self.nodes()
        except LocalClusterError:
            return None
        ids = [n["node_id"] for n in nodes if (n.get("labels") or {}).get(NODE_LABEL) == name]
        return ids[0] if ids else None

    def node_names(self) -> dict[str, str]:
        """Node id → name for every node ever seen (fake autoscaler workers are named ``auto``)."""
        return {
            n["node_id"]: (n.get("labels") or {}).get(NODE_LABEL, "auto")
            for n in self.nodes(alive_only=False)
        }

    def autoscaler_status(self) -> str:
        """The autoscaler's own report, as ``ray status`` prints it ('' before its first update)."""
        data = self.get("/api/cluster_status?format=1")["data"]
        return data.get("clusterStatus") or ""

    def active_node_types(self) -> dict[str, int]:
        """The autoscaler's count of active nodes per node type, e.g. ``{"ray.head.default": 1, "cpu": 2}``."""
        return parse_active_nodes(self.autoscaler_status())


def parse_active_nodes(status: str) -> dict[str, int]:
    """``Active:`` section of an autoscaler status report → node type → count (``{}`` before the first)."""
    counts: dict[str, int] = {}
    section = status.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in status else ""
    for line in section.splitlines():
        m = re.fullmatch(r"\s*(\d+)\s+(\S+)\s*", line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
