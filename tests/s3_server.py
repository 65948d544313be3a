"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, spoken to over HTTP.

The fixture sets the standard AWS variables (credentials, region, ``AWS_ENDPOINT_URL``) so that
``pyarrow.fs`` — and every subprocess started from the test — reaches that server, and creates one empty
bucket per test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (read with boto3: a second client, not the one under test)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """A fresh bucket on the session's moto server, with the AWS environment pointing at it."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": _moto_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"revmix-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=_moto_endpoint).create_bucket(Bucket=bucket)
    assert os.environ["AWS_ENDPOINT_URL"] == _moto_endpoint
    return S3Server(_moto_endpoint, bucket)
