"""Training checkpoints you can trust: plain tensors and JSON, complete or ignored, pruned on request.

A checkpoint is a folder ``checkpoints/stage<i>/step_<NNNNNN>`` holding

* ``trainable.safetensors`` — the trainable weights (the LoRA adapter, or every trainable parameter);
* ``optim.pt`` — the optimizer's and LR scheduler's state dicts, tensors and plain values only: it is read
  back with ``torch.load(weights_only=True)``, so a checkpoint from a shared bucket cannot run code;
* ``state.json`` — the Mixer's state, the step's last metrics record and the counters the stage's result
  needs (tokens, seconds, skipped steps), so a resume at the last step still writes a complete summary;
* with ``runtime.strategy: fsdp``, ``sharded/`` instead of ``trainable.safetensors`` and the optimizer's
  part of ``optim.pt``: every worker's shards of both (``torch.distributed.checkpoint``, written by every
  worker: :func:`save_sharded_checkpoint`, :mod:`revmix.platform.fsdp`), resumable on any number of workers;
* ``complete.json`` — written last: the size of every other file. A folder without it, or whose files
  differ from it (a truncated copy), is not a checkpoint and is never resumed from.

Rank 0 writes a checkpoint locally; when the run lives on a bucket (:mod:`revmix.platform.storage`) it
is then uploaded to the same layout there, marker last (:func:`publish_checkpoint`), and listing, pruning
and the completeness check work on either.

The folder is filled under a temporary name, every file is flushed to disk, and one rename makes it
appear whole; a kill at any moment leaves either the previous checkpoints or the new complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, overload

import torch

from revmix.atomic import fsync_dir, fsync_path
from revmix.platform.storage import Store, as_store

CKPT_STATE = "state.json"
CKPT_MARKER = "complete.json"
WEIGHTS = "trainable.safetensors"
OPTIM = "optim.pt"
SHARDED = "sharded"  # a sharded (FSDP) checkpoint's folder of weight and optimizer shards
CKPT_FILES = (WEIGHTS, OPTIM, CKPT_STATE, CKPT_MARKER)
STEP_DIR = re.compile(r"step_(\d{6})")
TEMP_DIR = re.compile(r"\.step_\d{6}\.[A-Za-z0-9_]+\.tmp")  # what save_checkpoint fills before the rename


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored: incomplete, truncated, foreign or not plain data."""


@overload
def stage_checkpoints(out_dir: Path, stage_idx: int) -> Path: ...
@overload
def stage_checkpoints(out_dir: Store, stage_idx: int) -> Store: ...
def stage_checkpoints(out_dir: Path | Store, stage_idx: int) -> Path | Store:
    """The folder of one stage's checkpoints in a run directory (local, or on the run's store)."""
    rel = f"checkpoints/stage{stage_idx}"
    return out_dir.child(rel) if isinstance(out_dir, Store) else Path(out_dir) / rel


def checkpoint_path(out_dir: Path, stage_idx: int, step: int) -> Path:
    return stage_checkpoints(out_dir, stage_idx) / f"step_{step:06d}"


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Trainable weights, optimizer, scheduler and ``state`` at ``path``: whole or not at all."""
    from safetensors.torch import save_file

    from revmix.platform.models import trainable_state_dict

    tmp = _temp_dir(path)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(model).items()}
        save_file(weights, str(tmp / WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM)
        _seal(tmp, path, state)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder; gone already after the rename
    fsync_dir(path.parent)


def save_sharded_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict, rank: int
) -> None:
    """:func:`save_checkpoint` of a sharded (FSDP) model, called by every worker: each writes its shards
    into rank 0's temporary folder, then rank 0 adds the scheduler and ``state`` and renames it. The
    folder must be one all workers see (one machine, or a shared file system)."""
    from revmix.platform import fsdp

    tmp = Path(fsdp.shared_value(str(_temp_dir(path)) if rank == 0 else None))
    try:
        fsdp.save_sharded(tmp / SHARDED, model, optimizer)
        fsdp.barrier()  # every worker's shards are on disk
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict()}, tmp / OPTIM)
            _seal(tmp, path, state)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if rank == 0:
        fsync_dir(path.parent)
    fsdp.barrier()  # the checkpoint is complete before any worker goes on (and reports it)


def _temp_dir(path: Path) -> Path:
    """The temporary folder a checkpoint is filled in, beside its final place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


def _seal(tmp: Path, path: Path, state: dict) -> None:
    """Write ``state``, then the marker listing every file's size (synced), then rename ``tmp`` to ``path``."""
    (tmp / CKPT_STATE).write_text(json.dumps(state))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    sizes = {p.relative_to(tmp).as_posix(): _synced_size(p) for p in files}
    (tmp / CKPT_MARKER).write_text(json.dumps({"format": 1, "files": sizes}))
    _synced_size(tmp / CKPT_MARKER)
    _replace_dir(tmp, path)


def _synced_size(file: Path) -> int:
    fsync_path(file)
    return file.stat().st_size


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an earlier checkpoint of the same step (a replayed step) is replaced."""
    if not path.exists():
        os.replace(tmp, path)
        return
    foreign = [p.name for p in path.iterdir() if not _ours(p)]
    if foreign:  # only checkpoint files (even an unfinished checkpoint's) are ours to remove
        raise CheckpointError(
            f"refusing to replace {path}: it holds {', '.join(sorted(foreign))}, not a checkpoint's files"
        )
    old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _ours(p: Path) -> bool:
    """A file or folder a checkpoint holds (perhaps an unfinished checkpoint's)."""
    return p.name in CKPT_FILES and p.is_file() or (p.name == SHARDED and p.is_dir())


def checkpoint_problem(path: Path | Store) -> str | None:
    """Why ``path`` (a local folder or a folder on a store) is not a complete checkpoint (None: it is one)."""
    store = as_store(path)
    try:
        marker = json.loads(store.read_text(CKPT_MARKER))
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no {CKPT_MARKER} (written last): the checkpoint was never finished"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {CKPT_MARKER}: {e}"
    for name, size in files.items():
        found = store.size(name)
        if found is None:
            return f"{name} is missing"
        if found != size:
            return f"{name} is {found} bytes, {CKPT_MARKER} says {size} (truncated or replaced)"
    return None


def publish_checkpoint(local: Path, target: Store) -> None:
    """Copy a complete local checkpoint to a store folder, its marker last (no-op where they coincide):
    an upload cut short has no marker and is never resumed from."""
    target.upload(local, "", last=(CKPT_MARKER,))


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Restore what :func:`save_checkpoint` (or, every worker calling it, :func:`save_sharded_checkpoint`)
    wrote; returns its ``state``."""
    from revmix.platform import fsdp

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    sharded = (path / SHARDED).is_dir()
    if sharded != fsdp.is_sharded(model):
        kinds = ("a full (runtime.strategy=ddp)", "a sharded (runtime.strategy=fsdp)")
        raise CheckpointError(
            f"checkpoint {path} is {kinds[sharded]} checkpoint; this run uses runtime.strategy="
            f"{'fsdp' if fsdp.is_sharded(model) else 'ddp'}: resume with the strategy that wrote it"
        )
    if sharded:
        fsdp.load_sharded(path / SHARDED, model, optimizer)
    else:
        _load_weights(path, model)
    try:  # tensors and plain values only: unpickling anything else could run code
        opt = torch.load(path / OPTIM, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}/{OPTIM}: not plain tensors and values ({e})") from None
    if not sharded:
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / CKPT_STATE).read_text())


def _load_weights(path: Path, model: Any) -> None:
    from safetensors.torch import load_file

    from revmix.platform.models import load_trainable_state_dict

    try:
        load_trainable_state_dict(model, load_file(str(path / WEIGHTS)))
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None


def _complete_names(store: Store) -> list[str]:
    found = [n for n in store.listdir() if STEP_DIR.fullmatch(n) and store.is_dir(n)]
    return sorted(n for n in found if checkpoint_problem(store.child(n)) is None)


@overload
def complete_checkpoints(root: Path) -> list[Path]: ...
@overload
def complete_checkpoints(root: Store) -> list[Store]: ...
def complete_checkpoints(root: Path | Store) -> list[Path] | list[Store]:
    """The complete checkpoints in ``root``, oldest first (incomplete or truncated ones are skipped);
    paths for a local folder, stores for a folder on a store."""
    names = _complete_names(as_store(root))
    if isinstance(root, Store):
        return [root.child(n) for n in names]
    return [Path(root) / n for n in names]


@overload
def latest_checkpoint(out_dir: Path, stage_idx: int) -> Path | None: ...
@overload
def latest_checkpoint(out_dir: Store, stage_idx: int) -> Store | None: ...
def latest_checkpoint(out_dir: Path | Store, stage_idx: int) -> Path | Store | None:
    """The newest complete checkpoint of a stage, or None."""
    done = complete_checkpoints(stage_checkpoints(out_dir, stage_idx))
    return done[-1] if done else None


def prune_checkpoints(root: Path | Store, keep_last: int | None) -> list[Path]:
    """Remove all but the ``keep_last`` newest complete checkpoints in ``root``; returns the removed ones
    (as paths under ``root``'s local path or, on a store, its path there).

    Only complete checkpoints are removed: their marker proves the platform wrote them.
    """
    if keep_last is None:
        return []
    store = as_store(root)
    done = _complete_names(store)
    removed = done[: max(len(done) - keep_last, 0)]
    for name in removed:
        store.delete_tree(name)
    return [Path(store.path(name)) for name in removed]


def remove_stale_temporaries(root: Path) -> None:
    """Remove what a killed :func:`save_checkpoint` left (its own temporary folder names only)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and TEMP_DIR.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
