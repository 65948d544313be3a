"""``revmix launch`` with the user's secrets and files at stake: the token over plain http, the token file's
mode, and what gets uploaded when there is no project.

No cluster is needed: the Jobs API client is replaced by one that cannot connect, so each run stops right
where it would first talk to the cluster (exit 1), after every check here has had its say. HOME is a
temporary folder in every test: the real ``~/.ray/auth_token`` is never read or changed.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.cluster.launch import plain_http_to_remote

UNREACHABLE = "revmix launch: cannot reach the Ray dashboard"


class NoCluster:
    """Stands in for ``JobSubmissionClient``: records what it was given, then fails to connect."""

    seen: list[dict] = []

    def __init__(self, address: str, headers: dict | None = None) -> None:
        NoCluster.seen.append({"address": address, "headers": dict(headers or {})})
        raise ConnectionError(address)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HOME (no token) and a project folder as the working directory; no cluster."""
    home = tmp_path / "home"
    home.mkdir()
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(project)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", NoCluster)
    NoCluster.seen = []
    return home


def _launch(address: str, *extra: str) -> int:
    return main(["launch", "--address", address, *extra, "--", "revmix", "--help"])


# ------------------------------------------------------------------------------------ plain http ---


@pytest.mark.parametrize(
    "address",
    ["http://10.0.0.5:8265", "http://head.example.org:8265", "10.1.2.3:8265", "http://[2001:db8::1]:8265"],
)
def test_a_token_over_plain_http_to_another_host_is_warned_about_first(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys, address: str
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    assert _launch(address) == 1
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "WARNING" in line)
    assert "plain http" in warning and "RAY_AUTH_TOKEN" in warning and "https://" in warning
    assert err.index("WARNING") < err.index(UNREACHABLE)  # said before anything was sent
    assert "s3cret" not in err
    assert NoCluster.seen[0]["headers"] == {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize(
    ("address", "token"),
    [
        ("http://127.0.0.1:8265", "t"),
        ("http://localhost:8265", "t"),
        ("http://[::1]:8265", "t"),
        ("https://head.example.org", "t"),
        ("http://10.0.0.5:8265", None),  # no token: nothing to leak
    ],
)
def test_no_warning_for_loopback_https_or_no_token(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys, address: str, token: str | None
) -> None:
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert _launch(address) == 1
    assert "WARNING" not in capsys.readouterr().err


def test_plain_http_to_remote_classifies_addresses() -> None:
    assert plain_http_to_remote("http://192.168.1.4:8265") and plain_http_to_remote("http://ray-head:8265")
    assert not plain_http_to_remote("http://127.0.0.2:8265") and not plain_http_to_remote("https://1.2.3.4")


# ------------------------------------------------------------------------------------ token file ---


@pytest.mark.parametrize("where", ["home", "RAY_AUTH_TOKEN_PATH"])
def test_a_token_file_others_can_read_is_made_private(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys, where: str
) -> None:
    path = sandbox / ".ray" / "auth_token" if where == "home" else sandbox / "tokens" / "ray"
    path.parent.mkdir(parents=True)
    path.write_text("filetoken\n")
    path.chmod(0o644)
    if where != "home":
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert _launch("http://127.0.0.1:1") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"{path} was readable by others (mode 644)" in capsys.readouterr().err
    assert NoCluster.seen[0]["headers"] == {"Authorization": "Bearer filetoken"}
    assert _launch("http://127.0.0.1:1") == 1  # already private: no second notice
    assert "readable by others" not in capsys.readouterr().err


# --------------------------------------------------------------------------------- working dir ---


def test_no_project_root_is_refused_before_anything_is_sent(
    sandbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    loose = tmp_path / "loose"  # /tmp/...: no pyproject.toml or .git here or above
    loose.mkdir()
    (loose / "private.txt").write_text("not for the cluster")
    monkeypatch.chdir(loose)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert _launch("http://127.0.0.1:8265") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"no project root at or above {loose.resolve()}" in line and "--working-dir" in line
    assert NoCluster.seen == []  # the cluster was never contacted


def test_the_home_directory_is_never_taken_for_a_project(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (sandbox / ".git").mkdir()  # a dotfiles repository in HOME
    (sandbox / "notes").mkdir()
    monkeypatch.chdir(sandbox / "notes")
    assert _launch("http://127.0.0.1:8265") == 2
    err = capsys.readouterr().err
    assert f"your home directory {sandbox.resolve()}" in err and "--working-dir" in err
    assert NoCluster.seen == []


def test_a_git_checkout_without_pyproject_is_a_project(
    sandbox: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "configs").mkdir()
    monkeypatch.chdir(repo / "configs")
    assert _launch("http://127.0.0.1:8265") == 1  # got as far as connecting
    assert UNREACHABLE in capsys.readouterr().err


def test_an_explicit_working_dir_needs_no_project_root(
    sandbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    monkeypatch.chdir(loose)
    assert _launch("http://127.0.0.1:8265", "--working-dir", str(loose)) == 1
    assert UNREACHABLE in capsys.readouterr().err


# ------------------------------------------------------------------------- the cluster test harness ---

_STARTER = """
import os, sys, time
from pathlib import Path
from tests.cluster.harness import start_process
node = start_process(["sleep", "300"], dict(os.environ), Path(sys.argv[1]))
print(node.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting to be reaped
    except psutil.NoSuchProcess:
        return True


def test_a_node_started_by_the_harness_dies_when_its_starter_is_killed_hard(tmp_path: Path) -> None:
    """``kill -9`` of the process that started a node (pytest, in real life) takes the node with it."""
    root = Path(__file__).resolve().parents[2]
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path / "node.log")],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    node = None
    try:
        assert starter.stdout is not None
        node = int(starter.stdout.readline())
        assert not _gone(node)
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not _gone(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(node), f"node process {node} outlived its starter"
    finally:
        if starter.poll() is None:
            starter.kill()
        if node is not None and not _gone(node):
            os.kill(node, signal.SIGKILL)
