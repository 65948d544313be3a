"""Session-wide fixtures: one local Ray instance shared by every integration test."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.s3_server"]  # the `s3` fixture: a moto S3 server on 127.0.0.1

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """``ray.init(address="local", num_cpus=2)`` once per session; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
