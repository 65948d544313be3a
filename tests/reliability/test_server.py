"""``revmix serve`` under bad input and abuse, driven over HTTP on 127.0.0.1.

One server for the module (hf backend on Ray Serve, an API key, tight limits). Its model is the project's
tiny random Qwen2, given a long context and two faults: greedy decoding never emits EOS (so a request can keep
the model busy for minutes), and the embedding row of token ``POISON`` is NaN, so sampling after it fails
inside the model — a stand-in for a corrupted checkpoint, the one way left to make the server fail
internally once its input checks pass.

The checks that need no server (the API-key rule for a public ``--host``, the pure helpers) run without Ray.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from revmix.platform.generation import serve_cli
from revmix.platform.generation.openai_api import API_KEY_ENV, ServerLimits
from tests.platform.generation.helpers import tiny_dir

NAME = "holdout"
APP = "revmix-reliability"
KEY = "reliability-test-key"
POISON = 511  # NaN embedding row: sampling after this token raises inside the model
LIMITS = ServerLimits(max_body_bytes=64_000, max_prompts=4, max_n=2, max_tokens=20_000, request_timeout_s=8.0)
LONG = 20_000  # greedy tokens that never end in EOS: 30 s or more on CPU, far past the time limit


def build_model(out: Path) -> str:
    """The project's tiny model with the faults of the module docstring, saved like any checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir())
    model.config.max_position_embeddings = 32_768  # rotary positions: room for minutes of decoding
    model.config.tie_word_embeddings = False  # output rows of its own: only the input row is poisoned
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for stop_id in (tok.eos_token_id, tok.pad_token_id):  # logit 0: never the greedy arg-max
            model.lm_head.weight[stop_id] = 0.0
        model.get_input_embeddings().weight[POISON] = float("nan")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_model(tmp_path_factory.mktemp("holdout"))


@pytest.fixture(scope="module")
def server(ray_local, model_dir: str) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of the module's server."""
    from ray import serve

    from revmix.platform.generation.serve import start_server, stop_server

    url = start_server(
        model_dir, name=NAME, num_cpus=0.5, batch_size=8, app_name=APP, api_key=KEY, limits=LIMITS
    )
    assert url.startswith("http://127.0.0.1:")
    yield url.removesuffix("/v1")
    stop_server(APP)
    serve.shutdown()  # the session's own Ray: later modules start Serve where they want it


def request(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = KEY,
    raw: bytes | None = None,
    timeout: float = 60,
) -> tuple[int, Any]:
    """(status, decoded JSON body or text) of one HTTP request."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read().decode()
    finally:
        conn.close()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload


def complete(base: str, timeout: float = 60, key: str | None = KEY, **fields: Any) -> tuple[int, Any]:
    body = {"model": NAME, "max_tokens": 4, "temperature": 0, "prompt": [5, 6], **fields}
    return request(base, "POST", "/v1/completions", body, key=key, timeout=timeout)


def error_of(answer: tuple[int, Any]) -> dict[str, Any]:
    status, body = answer
    assert isinstance(body, dict) and "error" in body, (status, body)
    return body["error"]


# ----------------------------------------------------------------------------------------- input


@pytest.mark.integration
@pytest.mark.slow
def test_token_ids_outside_the_vocabulary_are_a_400_naming_prompt(server: str) -> None:
    bad_prompts = [[5, 512], [[5], [-1]], [5, 10**12]]
    with ThreadPoolExecutor(6) as pool:  # sent together: the good ones share batches with the bad
        bad = [pool.submit(complete, server, prompt=p) for p in bad_prompts]
        good = [pool.submit(complete, server, prompt=[5, 6 + k]) for k in range(3)]
    for future, prompt in zip(bad, bad_prompts):
        status, _ = answer = future.result()
        error = error_of(answer)
        assert status == 400 and error["param"] == "prompt", (prompt, answer)
        assert "outside the vocabulary" in error["message"] and "0 to 511" in error["message"]
    assert [f.result()[0] for f in good] == [200, 200, 200]


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_request_fails_alone_with_an_error_id(server: str) -> None:
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 4}  # equal sampling: one batch, one call
    prompts = [[5, 6 + k] for k in range(6)]
    prompts.insert(3, [5, POISON])
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: complete(server, prompt=p, **sampled), prompts))
    failed = answers.pop(3)
    assert [status for status, _ in answers] == [200] * 6, answers
    assert all(len(body["choices"]) == 1 for _, body in answers)
    error = error_of(failed)
    assert failed[0] == 500 and re.fullmatch(r"[0-9a-f]{16}", error["id"]), failed
    assert error["id"] in error["message"]
    for internal in ("RuntimeError", "probability", "Traceback", "tensor", ".py"):
        assert internal not in json.dumps(failed[1])
    assert logged_with_traceback(error["id"])


def logged_with_traceback(error_id: str, wait_s: float = 15.0) -> bool:
    """Whether the error id and a traceback appear in this Ray session's logs (replica output included)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for f in logs.rglob("*"):
            if f.is_file() and f.stat().st_size < 50 * 2**20:
                text = f.read_text(errors="replace")
                at = text.find(error_id)
                if at >= 0 and "Traceback" in text[at : at + 5000]:
                    return True
        time.sleep(1)
    return False


# ----------------------------------------------------------------------------------------- API key


@pytest.mark.integration
@pytest.mark.slow
def test_the_api_key_is_required(server: str) -> None:
    for key in (None, "wrong", ""):
        for status, body in (request(server, "GET", "/v1/models", key=key), complete(server, key=key)):
            assert status == 401 and "API key" in body["error"]["message"], (key, status, body)
    assert request(server, "GET", "/v1/models")[0] == 200
    assert complete(server)[0] == 200
    assert request(server, "GET", "/health", key=None)[0] == 200  # probes carry no key


def refuse_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting Ray fail the test: these refusals must come before Ray (and before any bind)."""
    import ray

    def no(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("revmix serve started Ray before refusing")

    monkeypatch.setattr(ray, "init", no)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_a_public_host_needs_an_api_key(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from revmix.platform.generation.serve import check_exposure

    refuse_ray(monkeypatch)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for host in ("0.0.0.0", "192.168.1.20", "::", "myhost.example"):
        assert serve_cli.run(parse([tiny_dir(), "--host", host, "--address", "local"])) == 2
        err = capsys.readouterr().err
        assert f"--host {host}" in err and "--api-key" in err and API_KEY_ENV in err, err
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", "k")
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert serve_cli.api_key(parse([tiny_dir()])) == "from-env"
    assert serve_cli.api_key(parse([tiny_dir(), "--api-key", "flag"])) == "flag"


def test_key_check_and_limit_flags() -> None:
    from revmix.platform.generation.serve import authorized, key_digest

    digest = key_digest("s3cret")
    assert "s3cret" not in digest
    assert authorized("Bearer s3cret", digest) and authorized("bearer  s3cret ", digest)
    for header in (None, "", "Bearer", "Bearer s3cre", "Basic s3cret", "s3cret"):
        assert not authorized(header, digest), header
    assert authorized(None, None)  # no key set: open (loopback only)
    args = parse([tiny_dir(), "--max-n", "3", "--request-timeout-s", "2.5"])
    assert serve_cli.server_limits(args) == ServerLimits(max_n=3, request_timeout_s=2.5)
    assert serve_cli.server_limits(parse([tiny_dir()])) is None
    with pytest.raises(ValueError, match="--max-tokens must be a positive number, got 0"):
        ServerLimits(max_tokens=0)


# ----------------------------------------------------------------------------------------- limits


@pytest.mark.integration
@pytest.mark.slow
def test_limits_answer_4xx_naming_the_flag(server: str) -> None:
    big = json.dumps({"model": NAME, "prompt": "x" * LIMITS.max_body_bytes}).encode()
    cases = [
        (request(server, "POST", "/v1/completions", raw=big), 413, None, "--max-body-bytes"),
        (complete(server, prompt=["a"] * 5), 400, "prompt", "--max-prompts"),
        (complete(server, n=3, temperature=1.0), 400, "n", "--max-n"),
        (complete(server, max_tokens=LIMITS.max_tokens + 1), 400, "max_tokens", "--max-tokens"),
    ]
    chat = {
        "model": NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": LIMITS.max_tokens + 1,
    }
    cases.append(
        (request(server, "POST", "/v1/chat/completions", chat), 400, "max_completion_tokens", "--max-tokens")
    )
    for answer, status, param, flag in cases:
        error = error_of(answer)
        assert (answer[0], error["param"]) == (status, param), answer
        assert flag in error["message"], answer


@pytest.mark.integration
@pytest.mark.slow
def test_request_time_is_bounded_and_frees_the_model(server: str) -> None:
    start = time.monotonic()
    answer = complete(server, max_tokens=LONG, timeout=120)
    assert answer[0] == 408 and "--request-timeout-s" in error_of(answer)["message"], answer
    assert time.monotonic() - start < LIMITS.request_timeout_s + 10
    start = time.monotonic()  # decoding stopped with the request: the next one does not wait for it
    assert complete(server, prompt=[7], timeout=30)[0] == 200
    assert time.monotonic() - start < 5


@pytest.mark.integration
@pytest.mark.slow
def test_an_abandoned_stream_stops_decoding(server: str) -> None:
    url = urlsplit(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": NAME, "prompt": [5, 6], "max_tokens": LONG, "temperature": 0, "stream": True}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")  # decoding has begun
    conn.close()  # the client goes away mid-stream
    left = time.monotonic()
    assert complete(server, prompt=[7], timeout=30)[0] == 200
    # the stream would hold the model for LONG tokens, or until its time limit, without the cancellation
    assert time.monotonic() - left < LIMITS.request_timeout_s / 2


# ----------------------------------------------------------------------------------------- health


@pytest.mark.integration
@pytest.mark.slow
def test_health_runs_the_model(server: str) -> None:
    status, body = request(server, "GET", "/health", key=None)
    assert status == 200 and body == {"status": "ok", "model": NAME, "checked": "forward"}, body


def test_health_of_a_broken_model_is_503_with_an_error_id(model_dir: str) -> None:
    import torch

    from revmix.platform.generation.hf import HFGenerator
    from revmix.platform.generation.openai_api import OpenAIHandler

    gen = HFGenerator(model_dir, device="cpu")
    assert OpenAIHandler(gen, NAME).health()[0] == 200
    with torch.no_grad():
        gen.model.model.norm.weight.fill_(float("nan"))  # every position's logits: NaN
    status, body = OpenAIHandler(gen, NAME).health()
    assert status == 503 and body["status"] == "error" and re.fullmatch(r"[0-9a-f]{16}", body["error"]["id"])
    assert "non-finite" not in json.dumps(body)  # the cause is in the log, under the id


def test_a_probe_during_another_probe_runs_the_model_and_a_generation_makes_it_busy(model_dir: str) -> None:
    """The serving platform's periodic check and a client's GET /health may probe at the same moment: the
    second waits its turn and runs the model ("forward"); only a generation holding the model is "busy"."""
    import threading

    from revmix.platform.generation.hf import HFGenerator

    gen = HFGenerator(model_dir, device="cpu")
    inside, release = threading.Event(), threading.Event()

    def hold(module: Any, args: Any) -> None:
        if threading.current_thread().name == "first-probe":
            inside.set()
            assert release.wait(30)

    handle = gen.model.register_forward_pre_hook(hold)
    results: dict[str, bool] = {}
    first = threading.Thread(target=lambda: results.update(first=gen.probe()), name="first-probe")
    second = threading.Thread(target=lambda: results.update(second=gen.probe()), name="second-probe")
    first.start()
    try:
        assert inside.wait(30)  # the first probe is inside its forward pass
        second.start()
        second.join(0.5)
        assert second.is_alive()  # waiting its turn, not answering "busy" at once
    finally:
        release.set()
        first.join(30)
        second.join(30)
        handle.remove()
    assert results == {"first": True, "second": True}
    with gen._lock:  # what a generation holds for its whole decode
        assert gen.probe() is False


# ----------------------------------------------------------------------------------------- start / stop


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Someone else's server: answers every GET as if it served our model."""

    def do_GET(self) -> None:
        payload = json.dumps({"object": "list", "data": [{"id": NAME}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.integration
@pytest.mark.slow
def test_a_taken_port_fails_fast_naming_it(server: str, model_dir: str, monkeypatch, capsys) -> None:
    from revmix.platform.generation.serve import start_server

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    try:
        start = time.monotonic()
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} is already in use"):
            start_server(model_dir, port=port, name=NAME, app_name=f"{APP}-2", api_key=KEY)
        assert time.monotonic() - start < 10
        refuse_ray(monkeypatch)
        assert serve_cli.run(parse([model_dir, "--port", str(port), "--address", "local"])) == 2
        assert f"127.0.0.1:{port} is already in use" in capsys.readouterr().err
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert request(server, "GET", "/v1/models")[0] == 200  # the module's server is untouched


@pytest.mark.integration
@pytest.mark.slow
def test_stopping_deletes_only_its_own_app(server: str) -> None:
    from ray import serve

    from revmix.platform.generation.serve import stop_server

    @serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=0.1)
    class Neighbour:
        async def __call__(self, request: Any) -> str:
            return "still here"

    serve.run_many(  # both at once: one wait for their replicas
        [
            serve.RunTarget(Neighbour.bind(), name="reliability-neighbour", route_prefix="/neighbour"),
            serve.RunTarget(Neighbour.bind(), name="reliability-doomed", route_prefix="/doomed"),
        ]
    )
    try:
        stop_server("reliability-doomed")
        assert request(server, "GET", "/neighbour") == (200, "still here")
        assert request(server, "GET", "/doomed")[0] == 404
        assert request(server, "GET", "/v1/models")[0] == 200
        assert set(serve.status().applications) >= {APP, "reliability-neighbour"}
    finally:
        serve.delete("reliability-neighbour")
