"""``revmix launch``: unit tests of its pure parts, and one real run against a throwaway token-auth head."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import revmix
from revmix.cluster.launch import (
    DEFAULT_EXCLUDES,
    LaunchError,
    build_entrypoint,
    build_runtime_env,
    find_token,
    project_root,
)

# ------------------------------------------------------------------------------------------------ token ---


def test_find_token_follows_rays_precedence(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "tok"
    path_file.write_text("  from-path \n")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert find_token(env, home=tmp_path) == ("from-env", "RAY_AUTH_TOKEN")
    del env["RAY_AUTH_TOKEN"]
    assert find_token(env, home=tmp_path) == ("from-path", f"RAY_AUTH_TOKEN_PATH={path_file}")
    assert find_token({}, home=tmp_path) == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    assert find_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home=tmp_path)[0] is None
    token, reason = find_token({}, home=tmp_path / "nohome")
    assert token is None and "~/.ray/auth_token" in reason


def test_find_token_unreadable_or_empty_path_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home")
    with pytest.raises(LaunchError, match="cannot be read") as exc:
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    assert exc.value.code == 2
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(LaunchError, match="is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home=tmp_path)


# ------------------------------------------------------------------------------------------- entrypoint ---


def test_build_entrypoint_runs_the_cli_module_with_the_clusters_python() -> None:
    assert build_entrypoint(["--", "revmix", "sweep", "a b.yaml", "--out", "s3://b/x"]) == (
        "python -m revmix.cli sweep 'a b.yaml' --out s3://b/x"
    )
    assert build_entrypoint(["sweep", "x.yaml"], python="/opt/py/bin/python3") == (
        "/opt/py/bin/python3 -m revmix.cli sweep x.yaml"
    )
    assert build_entrypoint(["revmix", "--help"]) == "python -m revmix.cli --help"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ([], "nothing to run"),
        (["--", "revmix"], "nothing to run"),
        (["--", "python", "train.py"], "'python' is not a revmix command"),
        (["sweeep", "x.yaml"], r"valid: \['data', 'eval', 'launch'"),
    ],
)
def test_build_entrypoint_rejects_non_revmix_commands(command: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message) as exc:
        build_entrypoint(command)
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------- runtime env ---


def test_runtime_env_ships_project_and_local_package(tmp_path: Path) -> None:
    env = build_runtime_env(tmp_path, env_vars={"A": "1"})
    assert env["working_dir"] == str(tmp_path)
    (pkg,) = env["py_modules"]
    assert Path(pkg) == Path(revmix.__file__).resolve().parent and (Path(pkg) / "cli.py").is_file()
    assert env["excludes"] == list(DEFAULT_EXCLUDES) and env["env_vars"] == {"A": "1"}


def test_runtime_env_user_file_overrides_extends_and_merges(tmp_path: Path) -> None:
    user = {"excludes": ["/data"], "env_vars": {"A": "user", "B": "2"}, "pip": ["rich"], "working_dir": "/x"}
    env = build_runtime_env(tmp_path, user, env_vars={"A": "cli"})
    assert env["excludes"] == [*DEFAULT_EXCLUDES, "/data"]
    assert env["env_vars"] == {"A": "user", "B": "2"}
    assert env["pip"] == ["rich"] and env["working_dir"] == "/x"


def test_default_excludes_drop_root_outputs_but_keep_config_dirs_of_the_same_name(tmp_path: Path) -> None:
    """Packaged with Ray's own zip function: ``/runs`` drops ./runs, keeps configs/runs (``runs`` would not)."""
    from ray._private.runtime_env.packaging import _zip_files

    for rel in ("runs/t1/ckpt.bin", "outputs/o.txt", ".venv/lib/x.py", "configs/runs/sft.yaml",
                "configs/sweeps/quickstart.yaml", "src/revmix/__pycache__/a.pyc", "src/revmix/a.py"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    out = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), list(DEFAULT_EXCLUDES), str(out), include_gitignore=False)
    names = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert names == {"configs/runs/sft.yaml", "configs/sweeps/quickstart.yaml", "src/revmix/a.py"}


def test_project_root_is_nearest_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "configs" / "sweeps").mkdir(parents=True)
    assert project_root(tmp_path / "configs" / "sweeps") == tmp_path
    assert project_root(Path(revmix.__file__).parent) == Path(__file__).resolve().parents[2]


def test_cli_without_address_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from revmix.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["launch", "--", "revmix", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["revmix launch: no cluster address: pass --address http://HOST:8265 (or set RAY_ADDRESS)"]


# ------------------------------------------------------------------------------------- real cluster run ---


def _launch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "revmix.cli", "launch", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.heavy
def test_launch_against_a_real_token_auth_head(tmp_path: Path) -> None:
    """Submit through ``revmix launch`` to its own head on 127.0.0.1 (not ``ray_local``), stream, exit codes."""
    from tests.cluster.helpers import local_head

    work = tmp_path / "work"  # a tiny working_dir keeps the upload independent of the repo's size
    work.mkdir()
    (work / "marker.txt").write_text("shipped")
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    t0 = time.monotonic()
    with local_head() as head:
        addr = ["--address", head.address, "--working-dir", str(work)]
        ok = {**base, "RAY_AUTH_TOKEN": head.token}

        done = _launch([*addr, "--", "revmix", "--help"], ok, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "usage: revmix" in done.stdout and "train an experiment config" in done.stdout  # streamed logs
        job_id = done.stderr.split("revmix launch: submitted ", 1)[1].split()[0]
        assert f"revmix launch: job {job_id} SUCCEEDED" in done.stderr

        failed = _launch([*addr, "--", "revmix", "--no-such-option"], ok, tmp_path)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "unrecognized arguments: --no-such-option" in failed.stdout
        assert " FAILED" in failed.stderr.splitlines()[-1]

        status = _launch(["--address", head.address, "--status", job_id], ok, tmp_path)
        assert status.returncode == 0 and status.stdout.startswith(f"{job_id} SUCCEEDED")

        no_token = _launch([*addr, "--", "revmix", "--help"], {**base, "HOME": str(home)}, tmp_path)
        assert no_token.returncode == 2
        (line,) = no_token.stderr.strip().splitlines()
        assert "requires a Ray auth token (HTTP 401) and none was found" in line

        wrong = _launch([*addr, "--", "revmix", "--help"], {**base, "RAY_AUTH_TOKEN": "wrong"}, tmp_path)
        assert wrong.returncode == 2
        (line,) = wrong.stderr.strip().splitlines()
        assert "rejected the Ray auth token from RAY_AUTH_TOKEN (HTTP 403)" in line
    assert time.monotonic() - t0 < 90
