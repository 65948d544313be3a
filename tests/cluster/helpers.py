"""A throwaway Ray head on 127.0.0.1, in its own process group, for tests that need a real cluster.

Why not ``ray_local``: ``revmix launch`` talks to a *cluster* through the dashboard's Jobs API, with token
auth, exactly as a user would; the session fixture is an in-process ``ray.init``. Every port is chosen free
(GCS, dashboard, dashboard agent, runtime-env agent, metrics, Ray client) so the head never collides with
another Ray instance on a shared machine, and ``--temp-dir`` is private. Teardown kills the process group
``ray start --block`` leads, then any straggler whose command line names our private temp dir — by pid,
never the Ray CLI's stop command, which would kill every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.harness import free_ports, ray_head_command, start_process


@dataclass
class LocalHead:
    address: str  # dashboard, for the Jobs API: http://127.0.0.1:PORT
    gcs_address: str
    token: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen


def _dashboard_up(address: str, token: str) -> bool:
    req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stragglers(temp_dir: Path) -> list[int]:
    """Pids of processes whose command line names ``temp_dir`` (only processes this helper started do)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in part for part in p.info["cmdline"] or ()):
                mine.append(p.info["pid"])
    return mine


def stop_head(head: LocalHead, grace_s: float = 10.0) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after ``grace_s``, then stragglers by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGTERM)
    try:
        head.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=5)
    for pid in _stragglers(head.temp_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _start(temp_dir: Path, token: str, num_cpus: int, timeout_s: float, extra: list[str]) -> LocalHead:
    """One attempt: start the head and wait for its dashboard; raise (after cleanup) if it dies."""
    ports = free_ports(7)
    gcs, dash = ports[:2]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # the cluster's `python` (job entrypoints) must be this venv's interpreter
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    log = temp_dir / f"head-{gcs}.log"
    cmd = ray_head_command(ports, str(num_cpus), temp_dir, extra)
    proc = start_process(cmd, env, log)
    head = LocalHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token, temp_dir, log, proc)
    deadline = time.monotonic() + timeout_s
    try:
        while not _dashboard_up(head.address, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HeadStartError(
                    f"ray head did not come up (rc={proc.poll()}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
    except BaseException:
        stop_head(head)
        raise
    return head


class HeadStartError(RuntimeError):
    """The head exited or timed out during start-up."""


@contextlib.contextmanager
def local_head(
    num_cpus: int = 1, timeout_s: float = 60.0, extra_args: list[str] | None = None
) -> Iterator[LocalHead]:
    """Start ``ray start --head --block`` with token auth on loopback; always torn down, even on failure.

    Free ports can be taken by someone else between choosing and binding them (a busy shared machine), so a
    start that dies on a port clash is retried with fresh ports, twice.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rmx", dir="/tmp"))  # short: Ray's unix sockets live here
    token = secrets.token_hex(16)
    try:
        for attempt in range(3):
            try:
                head = _start(temp_dir, token, num_cpus, timeout_s, list(extra_args or []))
                break
            except HeadStartError as e:
                if attempt == 2 or ("already in use" not in str(e) and "Failed to start" not in str(e)):
                    raise
        try:
            yield head
        finally:
            stop_head(head)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
