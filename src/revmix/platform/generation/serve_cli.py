"""``revmix serve MODEL_OR_RUN_DIR``: an OpenAI-compatible endpoint for a model, on Ray Serve.

Examples::

    revmix serve runs/sft_tiny                  # the run's final model (runs/sft_tiny/model)
    revmix serve tiny:tiny --port 8000          # the locally built tiny model
    revmix serve /models/qwen --backend vllm    # Ray Serve LLM (vLLM); the default where a GPU is present
    revmix serve /models/qwen --backend vllm --engine-kwargs '{"tensor_parallel_size": 2}'
    REVMIX_API_KEY=... revmix serve runs/x --host 0.0.0.0   # reachable from other machines: key required

Then ``curl http://127.0.0.1:8000/v1/models`` or point any OpenAI client (or ``revmix eval --generator
openai --endpoint http://127.0.0.1:8000/v1``) at it. Ctrl-C deletes this server's Serve application (and
stops the local Ray instance it started; other applications on a shared cluster keep running).

Exit codes: 0 stopped by Ctrl-C/SIGTERM, 2 a bad argument (no such model, a non-loopback --host without an
API key, a taken --port, a limit that is not positive).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from revmix.platform.generation.openai_api import API_KEY_ENV, ServerLimits, limit_flag

DEFAULT_PORT = 8000
LIMIT_HELP = {
    "max_body_bytes": "largest request body, in bytes (413 above)",
    "max_prompts": "most prompts in one /v1/completions request",
    "max_n": "most completions per prompt ('n')",
    "max_tokens": "most new tokens per completion ('max_tokens')",
    "request_timeout_s": "longest generation time of one request, streams included (408 after)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_OR_RUN_DIR", help="model dir, run dir (uses DIR/model) or tiny:<scale>"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1); any other needs an API key",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT}; 0 = free port)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"clients must send 'Authorization: Bearer KEY' (hf backend); default ${API_KEY_ENV}, which is "
        "safer: a command line is visible to every user of the machine",
    )
    parser.add_argument(
        "--backend",
        choices=("hf", "vllm", "auto"),
        default="auto",
        help="hf (transformers) or vllm (Ray Serve LLM); auto = vllm where vLLM and a GPU are present, else hf",
    )
    parser.add_argument("--name", default=None, help="served model name (default: the directory's name)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the model replica")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="hf: most concurrent requests decoded together"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on CPU, bfloat16 on GPU",
    )
    parser.add_argument(
        "--engine-kwargs",
        default=None,
        metavar="JSON",
        help='vllm backend: engine arguments, e.g. \'{"tensor_parallel_size": 2, "max_model_len": 8192}\' '
        "(tensor_parallel_size, max_model_len, gpu_memory_utilization, max_num_seqs, dtype, enforce_eager)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)"
    )
    limits = parser.add_argument_group("request limits (hf backend)")
    for field in dataclasses.fields(ServerLimits):
        default = field.default
        limits.add_argument(
            limit_flag(field.name),
            type=type(default),
            default=None,
            help=f"{LIMIT_HELP[field.name]}; default {default}",
        )


def server_limits(args: argparse.Namespace) -> ServerLimits | None:
    """The limits given on the command line (None when none was: the server's defaults apply)."""
    given = {
        f.name: vars(args)[f.name] for f in dataclasses.fields(ServerLimits) if vars(args)[f.name] is not None
    }
    return ServerLimits(**given) if given else None


def api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``$REVMIX_API_KEY``; an empty one is no key."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def run(args: argparse.Namespace) -> int:
    from revmix.platform.generation.protocol import resolve_model_dir
    from revmix.platform.generation.serve import (
        check_exposure,
        default_name,
        ensure_port_free,
        resolve_backend,
    )
    from revmix.platform.generation.vllm_backend import engine_kwargs_from_json

    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        path = resolve_model_dir(args.model)
        backend = resolve_backend(args.backend)
        key, limits = api_key(args), server_limits(args)
        check_exposure(args.host, key)
        if backend == "vllm" and (key or limits):
            raise ValueError(
                "--api-key and the request limits need --backend hf: Ray Serve LLM enforces neither"
            )
        engine = engine_kwargs_from_json(args.engine_kwargs, "--engine-kwargs") if args.engine_kwargs else {}
        if engine and backend != "vllm":
            raise ValueError(f"--engine-kwargs needs --backend vllm (the backend here is {backend})")
        if args.port and address == "local":  # a fresh local Ray: nothing of ours can hold the port yet
            ensure_port_free(args.host, args.port)
    except (OSError, ValueError) as e:
        print(f"revmix serve: {e}", file=sys.stderr)
        return 2
    from revmix.platform.models import full_model_dir

    name = args.name or default_name(args.model)
    if backend != "vllm":  # hf loads an adapter stage itself (base + adapters merged in memory)
        return _serve(args, address, path, backend, name, key, limits, engine)
    with full_model_dir(path) as full:  # vLLM reads a full model: an adapter stage's merged copy
        return _serve(args, address, full, backend, name, key, limits, engine)


def _serve(
    args: argparse.Namespace,
    address: str,
    path: str,
    backend: str,
    name: str,
    key: str | None,
    limits: ServerLimits | None,
    engine: dict[str, Any],
) -> int:
    import ray

    from revmix.platform.generation.serve import APP_NAME, start_server, stop_server

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the server (a background job inherits SIGINT ignored; restore it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    ray.init(address=address, log_to_driver=False)
    try:
        url = start_server(
            path,
            host=args.host,
            port=args.port or None,
            backend=backend,
            name=name,
            num_cpus=args.num_cpus,
            batch_size=args.batch_size,
            dtype=args.dtype,
            api_key=key,
            limits=limits,
            engine_kwargs=engine,
        )
        print(f"revmix serve: {name!r} ({backend}) at {url}", flush=True)
        auth = f" -H 'Authorization: Bearer ${API_KEY_ENV}'" if key else ""
        print(f"  curl{auth} {url}/models", flush=True)
        print("  Ctrl-C (or SIGTERM) to stop", flush=True)
        while True:
            time.sleep(3600)
    except (OSError, ValueError) as e:  # found once connected: a port taken, a proxy already public
        print(f"revmix serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            stop_server(APP_NAME)
        finally:
            ray.shutdown()
