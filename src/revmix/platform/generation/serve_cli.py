"""``revmix serve MODEL_OR_RUN_DIR``: an OpenAI-compatible endpoint for a model, on Ray Serve.

Examples::

    revmix serve runs/sft_tiny                  # the run's final model (runs/sft_tiny/model)
    revmix serve tiny:tiny --port 8000          # the locally built tiny model
    revmix serve /models/qwen --backend vllm    # Ray Serve LLM (vLLM); the default where a GPU is present

Then ``curl http://127.0.0.1:8000/v1/models`` or point any OpenAI client (or ``revmix eval --generator
openai --endpoint http://127.0.0.1:8000/v1``) at it. Ctrl-C shuts Serve down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_OR_RUN_DIR", help="model dir, run dir (uses DIR/model) or tiny:<scale>"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: Serve has no auth)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT}; 0 = free port)"
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
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)"
    )


def run(args: argparse.Namespace) -> int:
    import ray

    from revmix.platform.generation.protocol import resolve_model_dir
    from revmix.platform.generation.serve import default_name, resolve_backend, start_server, stop_server

    try:
        path = resolve_model_dir(args.model)
        backend = resolve_backend(args.backend)
    except (FileNotFoundError, ValueError) as e:
        print(f"revmix serve: {e}", file=sys.stderr)
        return 2
    name = args.name or default_name(args.model)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both shut Serve down (a background job inherits SIGINT ignored; restore it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
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
        )
        print(f"revmix serve: {name!r} ({backend}) at {url}", flush=True)
        print(f"  curl {url}/models", flush=True)
        print("  Ctrl-C (or SIGTERM) to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            stop_server()
        finally:
            ray.shutdown()
