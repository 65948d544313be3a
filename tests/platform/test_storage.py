"""The storage layer against a local folder and a real S3 protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from revmix.platform.checkpoint import (
    CKPT_MARKER,
    complete_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    publish_checkpoint,
)
from revmix.platform.storage import STORAGE_ENV, StorageError, Store, local_copy, resolve_location


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "root")
    s3 = request.getfixturevalue("s3")
    return Store(s3.uri("root"))


def test_write_read_list_and_delete(store: Store):
    assert not store.exists() and store.listdir() == []
    store.write("a/b.json", '{"x": 1}')
    store.write("a/c.txt", b"bytes")
    store.write("top.txt", "t")
    assert store.read_text("a/b.json") == '{"x": 1}' and store.read_bytes("a/c.txt") == b"bytes"
    assert store.listdir() == ["a", "top.txt"] and store.listdir("a") == ["b.json", "c.txt"]
    assert store.walk() == ["a/b.json", "a/c.txt", "top.txt"]
    assert store.is_dir("a") and store.is_file("top.txt") and store.size("a/c.txt") == 5
    store.write("top.txt", "replaced")
    store.append_text("top.txt", "+more")
    assert store.read_text("top.txt") == "replaced+more"
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        store.read_text("nothing.txt")
    store.delete_tree("a")
    store.delete_file("top.txt")
    store.delete_file("top.txt")  # gone already: nothing to do
    assert store.walk() == []
    with pytest.raises(StorageError, match="whole store"):
        store.delete_tree("")


def test_upload_download_round_trip_with_marker_last(store: Store, tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    (src / "z.json").write_text("{}")
    store.upload(src, "up", last=("z.json",))
    assert store.walk("up") == ["sub/w.bin", "z.json"]
    back = store.download("up", tmp_path / "back")
    assert (back / "sub" / "w.bin").read_bytes() == b"\x00" * 1000 and (back / "z.json").read_text() == "{}"
    # the store pickles with its file system (what Ray workers receive)
    assert pickle.loads(pickle.dumps(store)).read_text("up/z.json") == "{}"
    with local_copy(store.url("up")) as path:
        assert (path / "z.json").read_text() == "{}"


def _fake_checkpoint(folder: Path, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "state.json").write_text('{"step": 1}')
    if complete:
        (folder / CKPT_MARKER).write_text('{"format": 1, "files": {"state.json": 11}}')
    return folder


def test_checkpoints_on_a_store_are_listed_checked_and_pruned(store: Store, tmp_path: Path):
    root = store.child("checkpoints/stage0")
    for step in (1, 2, 3):
        publish_checkpoint(_fake_checkpoint(tmp_path / f"step_{step:06d}"), root.child(f"step_{step:06d}"))
    store.upload(
        _fake_checkpoint(tmp_path / "x" / "step_000004", complete=False), "checkpoints/stage0/step_000004"
    )
    assert [c.url() for c in complete_checkpoints(root)] == [root.url(f"step_{s:06d}") for s in (1, 2, 3)]
    latest = latest_checkpoint(store, 0)
    assert latest is not None and latest.url() == root.url("step_000003")
    removed = prune_checkpoints(root, keep_last=1)
    assert [p.name for p in removed] == ["step_000001", "step_000002"]
    assert root.listdir() == ["step_000003", "step_000004"]  # the unfinished one is not ours to judge


def test_relative_out_goes_under_revmix_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/revmix/")
    assert resolve_location("sweep1") == "s3://bucket/revmix/sweep1"
    assert resolve_location(tmp_path / "x") == str(tmp_path / "x")  # an absolute path stays
    assert resolve_location("./x") == str(Path("x").absolute())  # so does an explicit ./ path
    assert resolve_location("gs://b/p/") == "gs://b/p"
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path))
    assert resolve_location("run") == str(tmp_path / "run")
    monkeypatch.delenv(STORAGE_ENV)
    assert resolve_location("run") == str(Path("run").absolute())


def test_a_missing_bucket_is_named_before_anything_is_written(s3):
    store = Store(f"s3://{s3.bucket}-missing/run")
    with pytest.raises(StorageError, match="does not exist"):
        store.check_reachable()
    Store(s3.uri("run")).check_reachable()  # the fixture's bucket exists


def test_a_pickled_s3_store_needs_no_environment(s3, monkeypatch: pytest.MonkeyPatch):
    """What a Ray worker gets: the endpoint and keys travel with the store, not with the process."""
    store = Store(s3.uri("p"))
    store.write("x.txt", "1")
    blob = pickle.dumps(store)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key)
    assert pickle.loads(blob).read_text("x.txt") == "1"


def test_train_and_sweep_refuse_a_missing_bucket_or_mlflow_sqlite_there_before_writing(s3, tmp_path, capsys):
    from revmix.cli import main
    from revmix.sweeps.runner import SweepExistsError, _check_tracking
    from revmix.sweeps.spec import load_sweep
    from tests.sweeps.helpers import sweep_raw, write_sweep

    root = Path(__file__).resolve().parents[2]
    missing = f"s3://{s3.bucket}-missing/run"
    assert main(["train", str(root / "configs/runs/sft_tiny.yaml"), "--out", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    sweep = write_sweep(tmp_path, sweep_raw(tracking={"mlflow": False}))
    assert main(["sweep", str(sweep), "--out", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    sweep = write_sweep(tmp_path, sweep_raw(tracking={"mlflow": True}))
    with pytest.raises(SweepExistsError, match="tracking_uri"):
        _check_tracking(load_sweep(sweep), Store(s3.uri("sweep")))
    assert s3.keys() == []
