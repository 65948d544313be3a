"""Serve a model with an OpenAI-compatible API on Ray Serve: ``start_server`` / ``stop_server``.

Two backends behind the same routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``):

- ``hf``: a Ray Serve deployment with a FastAPI ingress wrapping ``HFGenerator`` (``openai_api`` holds the
  wire format). Concurrent requests are grouped by ``serve.batch`` and decoded in one batched
  ``model.generate`` call, so a client sending 8 requests at once gets batch-of-8 throughput. It also
  answers ``echo=True, logprobs=k, max_tokens=0`` (prompt scoring), which ``OpenAIGenerator.score`` uses.
- ``vllm``: Ray Serve LLM (``LLMConfig`` + ``build_openai_app``), imported lazily because
  ``ray.serve.llm`` cannot even be imported without vLLM. On a CPU build of vLLM the settings of
  ``docs/vllm_cpu.md`` apply (CPU accelerator kind, one-CPU placement bundle, float32, small KV cache).

What holds (hf backend): an API key (``Authorization: Bearer``) when one is set, and none may be left out
on a non-loopback address; ``ServerLimits`` on body size, prompts, ``n``, ``max_tokens`` and request time;
token ids checked against the vocabulary; a batch where one request fails answers the others; a stream
whose client leaves stops decoding; ``/health`` runs the model; 500s carry an error id, not internals. A
port already taken fails before Serve starts, and ``stop_server`` deletes only its own application.
"""

# No `from __future__ import annotations` here: FastAPI must see real classes (Request) in the route
# signatures of the Serve ingress class, or it treats `request` as a JSON body field and answers 422.
import asyncio
import errno
import hashlib
import ipaddress
import json
import os
import secrets
import socket
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from revmix.platform.generation.openai_api import (
    API_KEY_ENV,
    APIError,
    ServerLimits,
    internal_error,
    limit_error,
)
from revmix.platform.generation.protocol import (
    SamplingParams,
    full_model_only,
    resolve_model_dir,
    vllm_usable,
)

if TYPE_CHECKING:  # hf.py imports torch; the deployment imports it in the replica, not at module import
    from revmix.platform.generation.hf import Completion
    from revmix.platform.generation.openai_api import GenerationJob

APP_NAME = "revmix-llm"
BACKENDS: tuple[str, ...] = ("hf", "vllm", "auto")
MAX_BATCH_SIZE = 16

api = FastAPI(title="revmix OpenAI-compatible server")


def key_digest(api_key: str) -> str:
    """What the deployment keeps of the API key: Serve shows deployment arguments, it must not show the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def authorized(header: str | None, digest: str | None) -> bool:
    """Whether an ``Authorization`` header carries the key (always, when the server has none)."""
    if digest is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(key_digest(token.strip()), digest)


async def read_body(request: Request, max_bytes: int, limits: ServerLimits) -> bytes:
    """The request body, refused with 413 once it passes ``max_bytes`` (by its Content-Length, or while it is
    read: a body without one is not buffered past the limit)."""
    too_big = limit_error(413, "the request body is too large", "max_body_bytes", limits)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


def error_response(e: Exception) -> JSONResponse:
    """An APIError as it is; anything else as a 500 with an error id (its traceback goes to the log)."""
    error = e if isinstance(e, APIError) else internal_error(e)
    return JSONResponse(error.body(), status_code=error.status)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class HFOpenAIServer:
    """One replica: an ``HFGenerator`` and the OpenAI routes over it, behind an optional API key."""

    def __init__(
        self,
        model_path: str,
        name: str,
        batch_size: int = MAX_BATCH_SIZE,
        dtype: str | None = None,
        limits: ServerLimits | None = None,
        api_key_digest: str | None = None,
    ) -> None:
        from revmix.platform.generation.hf import HFGenerator
        from revmix.platform.generation.openai_api import OpenAIHandler

        gen = HFGenerator(model_path, batch_size=batch_size, dtype=dtype)
        gen.probe()  # a model that cannot run one token fails the deployment here, not its first request
        self.handler = OpenAIHandler(gen, name, limits)
        self.limits, self.api_key_digest = self.handler.limits, api_key_digest
        # Ray's batch() overloads type the result as a plain callable, without its set_max_batch_size.
        self._generate_batch.set_max_batch_size(batch_size)  # type: ignore[attr-defined]

    async def check_health(self) -> None:
        """Serve's periodic check: a replica whose model fails (e.g. a CUDA error) is replaced."""
        await asyncio.to_thread(self.handler.gen.probe)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, jobs: "list[GenerationJob]") -> "list[list[Completion] | Exception]":
        from revmix.platform.generation.openai_api import generate_isolated

        return await generate_isolated(self.handler.gen, jobs)

    async def _generate(self, ids: list[int], params: SamplingParams) -> "list[Completion]":
        from revmix.platform.generation.openai_api import GenerationJob

        job = GenerationJob(ids, params)
        try:
            result = await self._generate_batch(job)
        finally:  # answered, timed out or its client gone: nobody waits any more
            job.cancelled.set()
        if isinstance(result, Exception):
            raise result
        return result

    def _require_key(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.api_key_digest):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'")

    async def _answer(self, request: Request, chat: bool) -> Any:
        try:
            self._require_key(request)
            raw = await read_body(request, self.limits.max_body_bytes, self.limits)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"request body is not valid JSON: {e}") from e
            if isinstance(body, dict) and body.get("stream"):
                ids, params = self.handler.stream_plan(body, chat)
                events = self.handler.stream_events(ids, params, chat)
                return StreamingResponse(events, media_type="text/event-stream")
            call = self.handler.chat if chat else self.handler.completions
            timeout = self.limits.request_timeout_s
            try:
                return JSONResponse(await asyncio.wait_for(call(body, self._generate), timeout))
            except TimeoutError:
                what = f"the request ran past {timeout:g} s"
                raise limit_error(408, what, "request_timeout_s", self.limits) from None
        except Exception as e:  # answered, not dropped
            return error_response(e)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._require_key(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse(self.handler.models())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Open without a key (load balancers probe it); it tells only whether the model runs."""
        status, body = await asyncio.to_thread(self.handler.health)
        return JSONResponse(body, status_code=status)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._answer(request, chat=True)


def build_hf_app(
    model_path: str,
    name: str,
    num_cpus: float = 1.0,
    batch_size: int = MAX_BATCH_SIZE,
    dtype: str | None = None,
    limits: ServerLimits | None = None,
    api_key: str | None = None,
) -> serve.Application:
    # mypy ignores what class decorators return: serve.deployment made HFOpenAIServer a Deployment.
    deployment = HFOpenAIServer.options(ray_actor_options={"num_cpus": num_cpus})  # type: ignore[attr-defined]
    digest = key_digest(api_key) if api_key else None
    return deployment.bind(model_path, name, batch_size, dtype, limits, digest)


def build_vllm_app(
    model_path: str,
    name: str,
    num_cpus: float = 1.0,
    dtype: str | None = None,
    max_model_len: int | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> serve.Application:
    """Ray Serve LLM app. On a GPU: vLLM defaults (bf16). On CPU (``vllm-cpu``): docs/vllm_cpu.md's settings."""
    import torch
    from ray.serve.llm import LLMConfig, build_openai_app

    from revmix.platform.generation.vllm_backend import vllm_cpu_env

    gpu = torch.cuda.is_available()
    engine = {"dtype": dtype or ("bfloat16" if gpu else "float32"), "seed": 0}
    if max_model_len is not None:
        engine["max_model_len"] = max_model_len
    kwargs: dict[str, Any] = {}
    if not gpu:
        engine.update(enforce_eager=True, max_model_len=max_model_len or _context_len(model_path, 2048))
        kwargs = dict(
            accelerator_config={"kind": "cpu"},
            placement_group_config={"bundles": [{"CPU": 1}]},
            deployment_config={"ray_actor_options": {"num_cpus": min(num_cpus, 0.5)}},
            runtime_env={"env_vars": vllm_cpu_env()},
        )
    engine.update(engine_kwargs or {})
    config = LLMConfig(
        model_loading_config={"model_id": name, "model_source": model_path}, engine_kwargs=engine, **kwargs
    )
    return build_openai_app(
        {"llm_configs": [config], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}}
    )


def _context_len(model_path: str, cap: int) -> int:
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return min(int(json.load(f).get("max_position_embeddings", cap)), cap)
    except (OSError, ValueError):
        return cap


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _family(host: str) -> socket.AddressFamily:
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def ensure_port_free(host: str, port: int) -> None:
    """Raise OSError naming ``host:port`` when it cannot be listened on (most often: another server has it).
    Checked before Serve starts: its proxy would fail to bind, and polling the port would find the other
    server. The check runs where this process runs, which is the head node for ``revmix serve``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            s.bind((host, port))
        except OSError as e:
            what = (
                "is already in use"
                if e.errno == errno.EADDRINUSE
                else f"cannot be listened on ({e.strerror})"
            )
            raise OSError(
                e.errno,
                f"{host}:{port} {what}; stop what holds it, or choose another --port (0 = any free port)",
            ) from e


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (a host name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse (ValueError) to serve on an address other machines can reach without an API key."""
    if not api_key and not is_loopback(host):
        raise ValueError(
            f"--host {host} can be reached from other machines, and without an API key anyone who reaches it "
            f"can use the model: set one (--api-key, or ${API_KEY_ENV}), or serve on --host 127.0.0.1"
        )


def resolve_backend(backend: str) -> str:
    """``auto`` → ``vllm`` where vLLM is usable and a GPU is present, else ``hf`` (on CPU the hf
    deployment starts in seconds, vllm-cpu in about a minute, and is no faster for small models)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown serve backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        return "vllm" if torch.cuda.is_available() and vllm_usable() else "hf"
    return backend


def wait_ready(
    base_url: str, timeout_s: float = 300.0, name: str | None = None, api_key: str | None = None
) -> None:
    """Poll ``GET {base_url}/models`` until it answers 200 (listing ``name``, when given); raise TimeoutError
    naming the URL otherwise, or RuntimeError at once when the server there serves something else."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"{base_url}/models", headers=headers), timeout=5
            ) as r:
                if r.status == 200:
                    _check_serves(base_url, r.read(), name)
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/models not ready after {timeout_s:.0f} s (last: {last})")


def _check_serves(base_url: str, answer: bytes, name: str | None) -> None:
    if name is None:
        return
    try:
        served = [m["id"] for m in json.loads(answer)["data"]]
    except (ValueError, KeyError, TypeError):
        served = []
    if name not in served:
        raise RuntimeError(
            f"{base_url}/models answers, but without model {name!r} (it lists {served}): another server holds "
            "this address"
        )


def start_server(
    model_path: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend: str = "hf",
    name: str | None = None,
    num_cpus: float = 1.0,
    batch_size: int = MAX_BATCH_SIZE,
    dtype: str | None = None,
    app_name: str = APP_NAME,
    ready_timeout_s: float = 600.0,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> str:
    """Deploy ``model_path`` (model dir, run dir or ``tiny:<scale>``) and return its base URL (``.../v1``).

    Starts a local Ray instance if none is connected (``RAY_ADDRESS`` is honoured). ``port=None`` or 0
    picks a free port; a given port that is taken raises OSError naming it, before Serve starts. Serve's
    HTTP options are fixed when Serve first starts in a cluster, so a second ``start_server`` on another
    port needs ``stop_server()`` and ``serve.shutdown()`` first. A non-loopback ``host`` needs ``api_key``;
    ``api_key`` and ``limits`` are the hf backend's (Ray Serve LLM's app enforces neither: ValueError);
    ``engine_kwargs`` (tensor_parallel_size, max_model_len, ...) the vllm backend's.
    """
    import ray

    path = resolve_model_dir(model_path)
    name = name or default_name(model_path)
    kind = resolve_backend(backend)
    check_exposure(host, api_key)
    if kind == "vllm" and (api_key or limits):
        raise ValueError("an API key and request limits need the hf backend: Ray Serve LLM enforces neither")
    if kind == "hf" and engine_kwargs:
        raise ValueError(f"engine arguments {sorted(engine_kwargs)} need the vllm backend (this one is hf)")
    if kind == "vllm":
        full_model_only(path, "revmix serve --backend vllm")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
    host, port = _http_address(host, port, api_key)
    if kind == "hf":
        app = build_hf_app(path, name, num_cpus, batch_size, dtype, limits, api_key)
    else:
        app = build_vllm_app(path, name, num_cpus=num_cpus, dtype=dtype, engine_kwargs=engine_kwargs)
    serve.run(app, name=app_name, route_prefix="/")
    base_url = f"http://{host}:{port}/v1"
    wait_ready(base_url, ready_timeout_s, name, api_key)
    return base_url


def _http_address(host: str, port: int | None, api_key: str | None) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens: started on (host, port), or the one already running in the
    cluster when no port was asked for (it must then be as private as ``host``, or have a key)."""
    actual = _serve_http_address()
    if port and actual != (host, port):
        ensure_port_free(host, port)
    if actual is None:
        port = port or free_port(host)
        serve.start(http_options={"host": host, "port": port})
        actual = _serve_http_address() or (host, port)
    if actual != (host, port):
        if port and actual[1] != port:
            raise RuntimeError(
                f"Ray Serve already runs in this cluster on {actual[0]}:{actual[1]}; it cannot move to "
                f"{host}:{port}. Call stop_server() and serve.shutdown() first, or pass port={actual[1]}"
            )
        check_exposure(actual[0], api_key)  # an earlier Serve instance (e.g. another test) fixed the address
    return actual


def _serve_http_address() -> tuple[str, int] | None:
    """(host, port) of the Serve proxy running in the cluster; None when Serve is not running (or where
    Serve's private client API has moved)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        return str(client.http_config.host), int(client.http_config.port)
    except Exception:
        return None


def stop_server(app_name: str = APP_NAME) -> None:
    """Delete this server's Serve application, and only it: other applications in the cluster and Serve's
    HTTP proxy keep running (``serve.shutdown()`` would end every application, on a shared cluster too).
    Nothing to do when Serve is not running (a server that failed before it started)."""
    if _serve_http_address() is not None:
        serve.delete(app_name)


def default_name(model_path: str) -> str:
    """The served model name: the directory's name (the run's, for a run directory)."""
    p = os.path.normpath(os.fspath(model_path))
    base = os.path.basename(p)
    if base == "model" and os.path.isfile(os.path.join(p, "config.json")):
        base = os.path.basename(os.path.dirname(p)) or base
    return base or p
