"""``revmix launch``: run any revmix command on a Ray cluster through the Ray Jobs API.

    revmix launch --address http://HOST:8265 [--runtime-env FILE] [--no-wait] -- revmix sweep SWEEP.yaml
    revmix launch --address http://HOST:8265 --status JOB | --logs JOB [--follow] | --stop JOB

The job ships the project the way a Ray user would expect, for a cluster whose nodes already have revmix's
dependencies installed (the launcher configs' setup commands, or the KubeRay image):

- ``working_dir`` = the project root (the nearest parent of the current directory holding a
  ``pyproject.toml`` or ``.git``), so relative paths such as ``configs/sweeps/quickstart.yaml`` resolve on
  the cluster; ``.venv``, ``.git``, ``runs/`` and ``outputs/`` at the root are excluded, as is anything in
  ``.gitignore``. Without a project root (or when it would be the home directory) nothing is uploaded:
  the command stops with exit code 2 and asks for ``--working-dir``;
- ``py_modules`` = the local ``revmix`` package directory, which Ray puts on ``PYTHONPATH`` ahead of
  site-packages — the cluster runs *this* checkout's code, not the copy installed when the nodes were set
  up, without a slow per-job ``pip`` install;
- the entrypoint is ``python -m revmix.cli ...``: the cluster's ``python`` (first on the head's PATH, or
  ``--python``), never the absolute path of the local interpreter, which does not exist there.

Auth: Ray >= 2.52 clusters run with token auth, and ``JobSubmissionClient`` only attaches a token when the
*client* process has ``RAY_AUTH_MODE=token`` set (``ray._private.authentication.http_token_authentication.
get_auth_headers_if_auth_enabled``). We look the token up the way Ray does — ``RAY_AUTH_TOKEN``, then the
file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` — and pass it as an ``Authorization:
Bearer`` header ourselves, so no extra variable is needed. ``RAY_AUTH_MODE=disabled`` sends none. A 401
without a token, or a 403 (wrong token), is one line on stderr and exit code 2. The token grants running
any code on the cluster, so: a warning goes to stderr before it is sent over plain ``http://`` to a host
that is not this machine (use ``https://`` or an SSH tunnel to 127.0.0.1), and a token file of ours that
others may read (Ray writes ``~/.ray/auth_token`` with the default umask) is made private (0600).

Exit codes: 0 the job SUCCEEDED (or was submitted, with ``--no-wait``; or the query worked); 1 the job
FAILED/STOPPED or the cluster could not be reached; 2 usage or auth errors; 130 interrupted (the job keeps
running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import stat
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

# Always excluded from working_dir. A leading "/" anchors a pattern at the project root (gitignore syntax),
# so configs/runs/ still ships while the top-level runs/ output directory does not.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/.venv",
    "/.venv-vllm",
    "/.git",
    "/runs",
    "/outputs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
)
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROJECT_MARKERS: tuple[str, ...] = ("pyproject.toml", ".git")


class LaunchError(Exception):
    """A problem to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ pure parts ---


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> tuple[str | None, str]:
    """``(token, where it came from)`` in Ray's order; ``(None, reason)`` when there is none to send.

    Like Ray, a set but unreadable or empty ``RAY_AUTH_TOKEN_PATH`` is an error rather than a silent
    fall-through to the default file.
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = read_token(path)
        except OSError as e:
            raise LaunchError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {e.strerror}", code=2) from None
        if not token:
            raise LaunchError(f"RAY_AUTH_TOKEN_PATH={path} is empty", code=2)
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = (Path.home() if home is None else home) / ".ray" / "auth_token"
    with contextlib.suppress(OSError):  # absent (the usual case) or unreadable: Ray treats both as "no token"
        if token := read_token(default):
            return token, str(default)
    return None, "no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def read_token(path: Path) -> str:
    """The token in ``path``, stripped. A token file the current user owns loses its group and other
    permissions first (Ray writes ``~/.ray/auth_token`` with the umask, often 0644), saying so on stderr;
    anyone else's file is left be. Raises OSError when ``path`` cannot be read (absent).
    """
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 and info.st_uid == os.getuid():
        try:
            os.chmod(path, 0o600)
        except OSError as e:  # a read-only mount: the token is still usable, say what is wrong
            print(
                f"revmix launch: WARNING: {path} is readable by others (mode {mode:o}) and chmod failed: "
                f"{e.strerror}",
                file=sys.stderr,
            )
        else:
            print(
                f"revmix launch: {path} was readable by others (mode {mode:o}); it holds the cluster's auth "
                "token, so it is now 0600",
                file=sys.stderr,
            )
    return path.read_text().strip()


def project_root(start: Path) -> Path:
    """The nearest directory at or above ``start`` holding a ``pyproject.toml`` or ``.git``.

    Raises :class:`LaunchError` (exit 2) when there is none, or when it is the home directory (a
    dotfiles repository): uploading that would ship everything the user has to the cluster.
    """
    start = start.resolve()
    for d in (start, *start.parents):
        marker = next((m for m in PROJECT_MARKERS if (d / m).exists()), None)
        if marker is None:
            continue
        if d == Path.home().resolve():
            raise LaunchError(
                f"the project root found from {start} is your home directory {d} (it holds {marker}); "
                "refusing to upload it as the job's working_dir: run from the project, or pass --working-dir DIR",
                2,
            )
        return d
    raise LaunchError(
        f"no project root at or above {start} (no {' or '.join(PROJECT_MARKERS)}): refusing to upload "
        f"{start} as the job's working_dir; run from the project, or pass --working-dir DIR",
        2,
    )


def plain_http_to_remote(address: str) -> bool:
    """Whether ``address`` is plain ``http`` to a host other than this machine (the token would cross a
    network in clear text). Host names other than ``localhost`` count as remote: they are not resolved."""
    from revmix.platform.generation.serve import is_loopback

    parts = urlsplit(address)
    return parts.scheme == "http" and not is_loopback(parts.hostname or "")


def build_entrypoint(command: list[str], python: str = "python") -> str:
    """``["revmix", "sweep", "x.yaml"]`` -> ``python -m revmix.cli sweep x.yaml`` (shell-quoted).

    The leading ``revmix`` is optional. The command name is checked here against the CLI's commands, so a
    typo fails before anything is uploaded; ``python``/``bash``/... are refused: ``launch`` runs revmix.
    """
    from revmix.cli import COMMANDS

    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "revmix":
        args = args[1:]
    if not args:
        raise LaunchError("nothing to run: give a revmix command after --, e.g. -- revmix sweep FILE", 2)
    if not args[0].startswith("-") and args[0] not in COMMANDS:
        raise LaunchError(
            f"{args[0]!r} is not a revmix command; valid: {sorted(COMMANDS)} (write: -- revmix COMMAND ...)",
            2,
        )
    return shlex.join([python, "-m", "revmix.cli", *args])


def build_runtime_env(
    working_dir: Path, user_env: dict[str, Any] | None = None, env_vars: dict[str, str] | None = None
) -> dict[str, Any]:
    """The job's runtime env: project ``working_dir`` + local ``revmix`` as ``py_modules`` + excludes.

    ``user_env`` (from ``--runtime-env``) overrides keys, except that its ``excludes`` extend the defaults
    and its ``env_vars`` merge over ours.
    """
    import revmix

    user_env = dict(user_env or {})
    env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "py_modules": [str(Path(revmix.__file__).resolve().parent)],
        "excludes": list(DEFAULT_EXCLUDES) + list(user_env.pop("excludes", [])),
    }
    merged_vars = {**(env_vars or {}), **user_env.pop("env_vars", {})}
    if merged_vars:
        env["env_vars"] = merged_vars
    env.update(user_env)
    return env


def _parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env expects KEY=VALUE, got {pair!r}", 2)
        out[key] = value
    return out


def _load_runtime_env(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LaunchError(f"--runtime-env {path}: {e}", 2) from None
    if not isinstance(data, dict):
        raise LaunchError(f"--runtime-env {path}: expected a YAML mapping (a Ray runtime_env)", 2)
    return data


# ---------------------------------------------------------------------------------------------- CLI ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--status", metavar="JOB", help="print a job's status and exit")
    what.add_argument("--logs", metavar="JOB", help="print a job's logs and exit (see --follow)")
    what.add_argument("--stop", metavar="JOB", help="stop a running job")
    parser.add_argument("--follow", action="store_true", help="with --logs: stream until the job ends")
    parser.add_argument("--runtime-env", metavar="FILE", help="YAML runtime_env merged over the default")
    parser.add_argument(
        "--working-dir", metavar="DIR", help="directory shipped as working_dir (default: project root)"
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job env var")
    parser.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    parser.add_argument("--job-id", help="submission id to use (default: generated by Ray)")
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job id and exit")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- revmix COMMAND ...: the revmix command to run"
    )


def _client(address: str) -> Any:
    """A ``JobSubmissionClient`` with our token header; auth/connection failures become ``LaunchError``."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token, source = find_token()
    if token and plain_http_to_remote(address):
        print(
            f"revmix launch: WARNING: sending the Ray auth token (from {source}) over plain http to {address}; "
            "anyone on the network path can read it and run code on the cluster. Use https:// or an SSH "
            "tunnel (ssh -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265)",
            file=sys.stderr,
        )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise _auth_error(address, str(e), token, source) from None
    except ConnectionError:
        raise LaunchError(
            f"cannot reach the Ray dashboard at {address} (is the cluster up / tunnel open?)"
        ) from None


def _auth_error(address: str, detail: str, token: str | None, source: str) -> LaunchError:
    if token is None:
        return LaunchError(
            f"{address} requires a Ray auth token (HTTP 401) and none was found ({source}): set "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token "
            "(`ray get-auth-token` on the head prints it)",
            2,
        )
    status = "403" if "Authentication failed" in detail else "401"
    return LaunchError(f"{address} rejected the Ray auth token from {source} (HTTP {status})", 2)


async def _stream_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_terminal(client: Any, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's terminal status; log streaming can end a moment before the status flips."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _follow(client: Any, address: str, job_id: str) -> int:
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(
            f"revmix launch: stopped following; job {job_id} keeps running "
            f"(stop it with: revmix launch --address {address} --stop {job_id})",
            file=sys.stderr,
        )
        return 130
    status = _wait_terminal(client, job_id)
    print(f"revmix launch: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _run(args: argparse.Namespace) -> int:
    if not args.address:
        raise LaunchError("no cluster address: pass --address http://HOST:8265 (or set RAY_ADDRESS)", 2)
    address = args.address if "://" in args.address else f"http://{args.address}"
    query = args.status or args.logs or args.stop
    if query and [a for a in args.command if a != "--"]:
        raise LaunchError("--status/--logs/--stop take no command after --", 2)
    if query is None:  # usage errors before connecting
        entrypoint = build_entrypoint(args.command, python=args.python)
        user_env = _load_runtime_env(args.runtime_env) if args.runtime_env else None
        working_dir = Path(args.working_dir) if args.working_dir else project_root(Path.cwd())
        runtime_env = build_runtime_env(working_dir, user_env, _parse_env_pairs(args.env))
    client = _client(address)

    if args.status:
        info = client.get_job_info(args.status)
        print(f"{args.status} {info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0
    if args.logs:
        if args.follow:
            return _follow(client, address, args.logs)
        sys.stdout.write(client.get_job_logs(args.logs))
        return 0
    if args.stop:
        stopped = client.stop_job(args.stop)
        print(f"{args.stop} {'stop requested' if stopped else 'was not running'}")
        return 0

    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=args.job_id,
        metadata={"revmix_command": entrypoint},
    )
    print(f"revmix launch: submitted {job_id} to {address}: {entrypoint}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    return _follow(client, address, job_id)


def run(args: argparse.Namespace) -> int:
    """Entry point for the dispatcher; every expected failure is one line on stderr plus an exit code."""
    from ray.exceptions import AuthenticationError

    try:
        return _run(args)
    except LaunchError as e:
        print(f"revmix launch: {e}", file=sys.stderr)
        return e.code
    except AuthenticationError as e:  # raised mid-session, e.g. by submit_job's package upload
        token, source = find_token()
        print(f"revmix launch: {_auth_error(args.address, str(e), token, source)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the Jobs API's errors: unknown job id, rejected runtime_env, ...
        print(f"revmix launch: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
