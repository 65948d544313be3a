"""OpenAIGenerator against a scripted stdlib HTTP server on 127.0.0.1: the client's retries and time-out as
configured, errors that name the endpoint, concurrency bound and the echo-scoring fallback. (Against a real
``revmix serve``: test_serve.py.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from revmix.platform.generation.openai_backend import EndpointError, OpenAIGenerator
from revmix.platform.generation.protocol import SamplingParams

# (status, JSON body) or (status, JSON body, extra headers)
Reply = tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]]
RETRY_SOON = {"retry-after-ms": "50"}  # the client honours a server's Retry-After instead of its back-off


class Script:
    """Answers POSTs with ``respond(path, body, call_index)``; records calls and peak concurrency."""

    def __init__(self, respond: Callable[[str, dict[str, Any], int], Reply], delay: float = 0.0) -> None:
        self.respond, self.delay = respond, delay
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.inflight = self.peak = 0
        self.lock = threading.Lock()


@pytest.fixture
def server() -> Iterator[Callable[..., tuple[str, Script]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(respond: Callable[[str, dict[str, Any], int], Reply], delay: float = 0.0) -> tuple[str, Script]:
        script = Script(respond, delay)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (stdlib name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with script.lock:
                    index = len(script.calls)
                    script.calls.append((self.path, body))
                    script.inflight += 1
                    script.peak = max(script.peak, script.inflight)
                time.sleep(script.delay)
                status, payload, *headers = script.respond(self.path, body, index)
                with script.lock:
                    script.inflight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in (headers[0] if headers else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1", script

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def chat_reply(text: str, n: int = 1) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": f"{text}{i}"}, "finish_reason": "stop"}
            for i in reversed(range(n))  # out of order on purpose: the client must sort by index
        ],
    }


def test_retries_5xx_as_the_server_asks_then_succeeds(server) -> None:
    url, script = server(
        lambda path, body, i: (
            (503, {"error": {"message": "busy"}}, RETRY_SOON) if i < 2 else (200, chat_reply("ok", 2))
        )
    )
    gen = OpenAIGenerator(url, model="m", max_retries=3)
    start = time.monotonic()
    assert gen.generate(["q"], SamplingParams(n=2, max_new_tokens=5)) == [["ok0", "ok1"]]
    assert time.monotonic() - start >= 2 * 0.05  # waited as Retry-After said, twice
    assert len(script.calls) == 3
    path, body = script.calls[-1]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "q"}]
    assert (body["max_tokens"], body["n"], body["temperature"], body["seed"]) == (5, 2, 0.0, 0)


def test_gives_up_after_max_retries_and_names_the_endpoint(server) -> None:
    url, script = server(lambda path, body, i: (500, {"error": {"message": "boom"}}, RETRY_SOON))
    gen = OpenAIGenerator(url, model="m", max_retries=2, chat=False)
    with pytest.raises(
        EndpointError,
        match=r"POST /completions on http://127.0.0.1:\d+/v1 \(model 'm'\) failed after 3 attempts "
        r"with HTTP 500: boom",
    ):
        gen.generate(["q"], SamplingParams())
    assert len(script.calls) == 3


def test_client_errors_are_not_retried(server) -> None:
    url, script = server(lambda path, body, i: (400, {"error": {"message": "max_tokens too large"}}))
    gen = OpenAIGenerator(url, model="m", max_retries=3)
    with pytest.raises(EndpointError, match=r"\(model 'm'\) failed with HTTP 400: max_tokens too large"):
        gen.generate(["q"], SamplingParams())
    assert len(script.calls) == 1


def test_connection_refused_is_retried_then_reported() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, timeout=2)
    with pytest.raises(EndpointError, match="failed after 2 attempts: APIConnectionError"):
        gen.generate(["q"], SamplingParams())


def test_timeout_bounds_each_attempt(server) -> None:
    url, script = server(lambda path, body, i: (200, chat_reply("late")), delay=2.0)
    gen = OpenAIGenerator(url, model="m", max_retries=0, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"/chat/completions .* failed after 1 attempt: APITimeoutError"):
        gen.generate(["q"], SamplingParams())
    assert time.monotonic() - start < 1.5 and len(script.calls) == 1


def test_rejects_settings_the_client_cannot_use() -> None:
    with pytest.raises(ValueError, match="max_retries >= 0, timeout > 0; got 8, -1, 60"):
        OpenAIGenerator("http://127.0.0.1:9/v1", model="m", max_retries=-1)


def test_concurrency_is_bounded_and_order_kept(server) -> None:
    def respond(path: str, body: dict[str, Any], i: int) -> Reply:
        return 200, chat_reply(body["messages"][0]["content"])

    url, script = server(respond, delay=0.15)
    gen = OpenAIGenerator(url, model="m", concurrency=2)
    prompts = [f"p{i}" for i in range(6)]
    assert gen.generate(prompts, SamplingParams()) == [[f"p{i}0"] for i in range(6)]
    assert script.peak == 2


def test_score_by_token_ids_with_echo_fallback(server) -> None:
    from revmix.platform.models import build_tokenizer

    tok = build_tokenizer()
    prompt, completion = "Question: 2+3?\n", "Answer: 5"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]

    def respond(path: str, body: dict[str, Any], i: int) -> Reply:
        if body["max_tokens"] == 0:  # like servers that insist on >= 1 new token
            return 400, {"error": {"message": "max_tokens must be at least 1"}}
        ids = body["prompt"] + [7]  # echo + one generated token, which must be ignored
        return 200, {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "text": "",
                    "finish_reason": "length",
                    "logprobs": {
                        "tokens": [str(t) for t in ids],
                        "token_logprobs": [None] + [-float(t) for t in ids[1:]],
                        "top_logprobs": None,
                        "text_offset": list(range(len(ids))),
                    },
                }
            ],
        }

    url, script = server(respond)
    gen = OpenAIGenerator(url, model="m", chat=False, tokenizer=tok)
    assert gen.score([prompt], [completion]) == [[-float(t) for t in c_ids]]
    assert script.calls[0][1]["prompt"] == p_ids + c_ids and script.calls[0][1]["echo"] is True
    assert gen.score([prompt], [completion], max_tokens=2) == [[-float(t) for t in c_ids[:2]]]
    assert len(script.calls) == 3  # the 400 once, then max_tokens=1 is remembered


def test_chat_score_needs_tokenizer() -> None:
    gen = OpenAIGenerator("http://127.0.0.1:9/v1", model="m", chat=True)
    with pytest.raises(NotImplementedError, match="tokenizer="):
        gen.score(["q"], ["a"])
