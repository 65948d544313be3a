"""``revmix data reverse`` under faults: kills mid-write, a teacher that throttles or breaks, and answers that
would hang the check.

The teacher is the scripted one of the builder's own tests, either called directly or served over HTTP on
127.0.0.1 in the shape of an OpenAI-compatible ``/v1/chat/completions`` endpoint (so the real ``openai``
client, its retries and its ``Retry-After`` handling are what is exercised).
"""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from revmix.platform.data import reverse_builder as rb
from revmix.platform.generation.protocol import SamplingParams
from tests.platform.data.test_reverse_builder import ITEMS, Teacher, args_for, build, forward_rows, read

ROOT = Path(__file__).resolve().parents[2]
HANG = (
    "9^{9^{9^{9}}}"  # sympy computes this for hours, holding the GIL; math_verify's alarm is off on threads
)


class HttpTeacher:
    """``Teacher`` behind ``POST /v1/chat/completions`` on 127.0.0.1. ``faults`` are answered first, one per
    request: ``(status, headers, body)``; every request's arrival time is kept in ``times``."""

    def __init__(
        self, teacher: Teacher, faults: list[tuple[int, dict[str, Any], bytes]] | None = None
    ) -> None:
        self.teacher, self.faults = teacher, list(faults or [])
        self.times: list[float] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.times.append(time.monotonic())
                if owner.faults:
                    status, headers, payload = owner.faults.pop(0)
                    return self._send(status, headers, payload)
                params = SamplingParams(max_new_tokens=body["max_tokens"])
                text = owner.teacher.generate([body["messages"][0]["content"]], params)[0][0]
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                reply = {
                    "id": "c",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "t",
                    "choices": [choice],
                }
                self._send(200, {}, json.dumps(reply).encode())

            def _send(self, status: int, headers: dict[str, Any], payload: bytes) -> None:
                headers = dict(headers)
                self.send_response(status)
                self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                for key, value in headers.items():  # a callable value is computed as the reply goes out
                    self.send_header(key, value() if callable(value) else value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_teacher() -> Iterator[Any]:
    started: list[HttpTeacher] = []

    def start(teacher: Teacher | None = None, faults: list | None = None) -> HttpTeacher:
        started.append(HttpTeacher(teacher or Teacher(), faults))
        return started[-1]

    yield start
    for t in started:
        t.close()


def _write_input(tmp_path: Path, n: int) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forward_rows(n)))


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message}}).encode()


# ------------------------------------------------------------------------------------------- resume ---


def test_resume_keeps_a_whole_last_record_that_lost_only_its_newline(tmp_path: Path) -> None:
    build(tmp_path, Teacher(inconsistent=(ITEMS[1][0],)), n=2)
    for path in (tmp_path / "out.jsonl", tmp_path / "out.jsonl.dropped.jsonl"):
        path.write_bytes(path.read_bytes().rstrip(b"\n"))  # a kill between a record and its newline
    teacher = Teacher()
    report = build(tmp_path, teacher, n=4)
    assert len(teacher.calls) == 4  # i0 (kept) and i1 (dropped) were not asked again
    assert (report["kept"], report["dropped"]["inconsistent"], report["skipped_already_done"]) == (3, 1, 2)
    rows = read(tmp_path / "out.jsonl")  # every line parses: the next append did not merge into the last
    assert sorted((r["item_id"], r["direction"]) for r in rows) == sorted(
        (f"i{k}", d) for k in (0, 2, 3) for d in ("forward", "reverse")
    )
    assert [d["item_id"] for d in read(tmp_path / "out.jsonl.dropped.jsonl")] == ["i1"]


@pytest.mark.parametrize(
    "tail",
    [b'{"item_id": "i1", "direction": "forward"', b"\n", b'\n{"item_id": "i1", "direction": "rev'],
    ids=["forward-torn", "between-rows", "reverse-torn"],
)
def test_resume_over_a_pair_cut_by_a_kill_redoes_that_item_only(tmp_path: Path, tail: bytes) -> None:
    build(tmp_path, Teacher(), n=2)
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines(keepends=True)
    first_pair = b"".join(lines[:2])
    i1_forward = next(ln for ln in lines[2:] if b'"forward"' in ln).rstrip(b"\n")
    cut = tail if tail.startswith(b"{") else i1_forward + tail  # where the one write of item i1 stopped
    (tmp_path / "out.jsonl").write_bytes(first_pair + cut)
    teacher = Teacher()
    report = build(tmp_path, teacher, n=2)
    assert len(teacher.calls) == 2 and report["kept"] == 2 and report["this_run"]["kept"] == 1
    rows = read(tmp_path / "out.jsonl")
    assert len(rows) == 4 and len({(r["item_id"], r["direction"]) for r in rows}) == 4
    assert (tmp_path / "out.jsonl").read_bytes().startswith(first_pair)


def test_a_damaged_line_before_the_end_is_named_not_dropped(tmp_path: Path, capsys) -> None:
    _write_input(tmp_path, 2)
    build(tmp_path, Teacher(), n=1)
    good = (tmp_path / "out.jsonl").read_bytes()
    (tmp_path / "out.jsonl").write_bytes(b'{"item_id": "x", "dir\n' + good)
    assert rb.run(args_for(tmp_path), Teacher()) == 2
    assert f"{tmp_path / 'out.jsonl'}:1: not JSON" in capsys.readouterr().err
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"item_id": "x", "dir\n' + good  # nothing cut


# ---------------------------------------------------------------------------------- one item failing ---


def test_an_item_that_raises_is_logged_as_failed_and_the_run_goes_on(tmp_path: Path, capsys) -> None:
    _write_input(tmp_path, 3)
    broken = Teacher(fail_on_call=3, error=RuntimeError("teacher crashed"))  # item i1's first call
    assert rb.run(args_for(tmp_path, "--concurrency", "1"), broken) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "re-run" in out
    assert sorted({r["item_id"] for r in read(tmp_path / "out.jsonl")}) == ["i0", "i2"]
    (entry,) = read(tmp_path / "out.jsonl.dropped.jsonl")
    assert (entry["item_id"], entry["reason"], entry["detail"]) == (
        "i1",
        "failed",
        "RuntimeError: teacher crashed",
    )
    assert "Traceback" in entry["traceback"] and "teacher crashed" in entry["traceback"]
    assert rb.run(args_for(tmp_path), Teacher()) == 0  # failed items are retried
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["kept"] == 3


def test_a_reply_that_is_not_json_fails_its_item_only(tmp_path: Path, http_teacher, capsys) -> None:
    _write_input(tmp_path, 2)
    teacher = http_teacher(faults=[(200, {"Content-Type": "application/json"}, b"<html>proxy error</html>")])
    args = args_for(tmp_path, "--endpoint", teacher.url, "--concurrency", "1", "--max-retries", "0")
    assert rb.run(args) == 1
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert (report["kept"], report["dropped"]["failed"]) == (1, 1)
    (entry,) = read(tmp_path / "out.jsonl.dropped.jsonl")
    assert entry["reason"] == "failed" and entry["detail"] and "Traceback" in entry["traceback"]
    assert rb.run(args) == 0


def test_a_pathological_answer_times_out_instead_of_hanging_the_run(tmp_path: Path, http_teacher) -> None:
    """The check of item i1 answers a tower of powers; the CLI runs in a child so a hang fails the test."""

    class Pathological(Teacher):
        def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
            if "Solve the following" in prompts[0] and ITEMS[1][3] in prompts[0]:
                return [[f"Work.\nAnswer: ${HANG}$"]]
            return super().generate(prompts, params)

    _write_input(tmp_path, 3)
    teacher = http_teacher(Pathological())
    argv = ["data", "reverse", "--input", str(tmp_path / "in.jsonl"), "--endpoint", teacher.url]
    argv += ["--model", "t", "--out", str(tmp_path / "out.jsonl"), "--max-tokens", "64"]
    argv += ["--check-timeout", "2", "--concurrency", "3"]
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "revmix.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 90
    (entry,) = read(tmp_path / "out.jsonl.dropped.jsonl")
    assert entry["item_id"] == "i1" and entry["reason"] == "check_timeout"
    assert "longer than 2 s" in entry["detail"] and HANG in entry["check_output"]
    assert sorted({r["item_id"] for r in read(tmp_path / "out.jsonl")}) == ["i0", "i2"]


def test_the_checker_recovers_after_a_timeout() -> None:
    with rb.AnswerChecker(timeout_s=2) as checker:
        assert checker.equivalent(HANG, "3", "math") is None
        assert checker.equivalent("\\frac{1}{2}", "0.5", "math") is True
        assert checker.equivalent("0.4", "0.5", "math") is False


# ------------------------------------------------------------------------------------ Retry-After ---


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("how", ["seconds", "http-date"])
def test_a_throttled_request_waits_what_retry_after_asks(tmp_path: Path, http_teacher, how: str) -> None:
    _write_input(tmp_path, 1)
    headers: dict[str, Any] = {"Retry-After": "2"}
    if how == "http-date":  # in whole seconds, as the reply leaves: 3 s from then is 2-3 s away
        headers = {"Retry-After": lambda: email.utils.formatdate(time.time() + 3, usegmt=True)}
    teacher = http_teacher(faults=[(429, headers, _error("slow down"))])
    assert rb.run(args_for(tmp_path, "--endpoint", teacher.url)) == 0
    assert len(teacher.times) == 3  # the throttled call, its retry, the check
    wait = _gaps(teacher.times)[0]
    assert wait >= 1.9, wait  # the client's own first back-off is <= 0.5 s
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["kept"] == 1


def test_without_retry_after_the_back_off_grows_with_jitter(tmp_path: Path, http_teacher) -> None:
    _write_input(tmp_path, 1)
    faults: list[tuple[int, dict[str, Any], bytes]] = [(503, {}, _error("busy"))] * 3
    teacher = http_teacher(faults=faults)
    assert rb.run(args_for(tmp_path, "--endpoint", teacher.url, "--max-retries", "3")) == 0
    first, second, third = _gaps(teacher.times)[:3]
    assert 0.3 <= first <= 0.9 and 0.7 <= second <= 1.4 and 1.4 <= third <= 2.5, (first, second, third)


def test_a_retry_after_too_long_to_wait_leaves_the_item_for_a_rerun(
    tmp_path: Path, http_teacher, capsys
) -> None:
    _write_input(tmp_path, 2)
    teacher = http_teacher(faults=[(429, {"Retry-After": "3600"}, _error("quota exhausted"))])
    t0 = time.monotonic()
    assert rb.run(args_for(tmp_path, "--endpoint", teacher.url, "--concurrency", "1")) == 1
    assert time.monotonic() - t0 < 30  # neither an hour's wait nor a hammering of the endpoint
    (entry,) = read(tmp_path / "out.jsonl.dropped.jsonl")
    assert (
        entry["reason"] == "endpoint_error" and "HTTP 429" in entry["detail"] and "quota" in entry["detail"]
    )
    assert "1 endpoint_error" in capsys.readouterr().out
    assert rb.run(args_for(tmp_path, "--endpoint", teacher.url)) == 0


def test_check_timeout_must_be_positive(tmp_path: Path, capsys) -> None:
    _write_input(tmp_path, 1)
    assert rb.run(args_for(tmp_path, "--check-timeout", "0"), Teacher()) == 2
    assert "--check-timeout must be a positive number of seconds" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.jsonl")
