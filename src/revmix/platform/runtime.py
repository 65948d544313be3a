"""Connecting to Ray: an existing cluster when RAY_ADDRESS says so, otherwise a private local instance."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` once: join RAY_ADDRESS if set (a cluster / Ray job), else start a local instance.

    Never a bare ``ray.init()``: on a shared machine that could join someone else's cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
