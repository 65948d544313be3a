"""Training checkpoints you can trust: plain tensors and JSON, complete or ignored, pruned on request.

A checkpoint is a folder ``checkpoints/stage<i>/step_<NNNNNN>`` holding

* ``trainable.safetensors`` — the trainable weights (the LoRA adapter, or every trainable parameter);
* ``optim.pt`` — the optimizer's and LR scheduler's state dicts, tensors and plain values only: it is read
  back with ``torch.load(weights_only=True)``, so a checkpoint from a shared bucket cannot run code;
* ``state.json`` — the Mixer's state, the step's last metrics record and the counters the stage's result
  needs (tokens, seconds, skipped steps), so a resume at the last step still writes a complete summary;
* ``complete.json`` — written last: the size of every other file. A folder without it, or whose files
  differ from it (a truncated copy), is not a checkpoint and is never resumed from.

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
from typing import Any

import torch

from revmix.atomic import fsync_dir, fsync_path

CKPT_STATE = "state.json"
CKPT_MARKER = "complete.json"
WEIGHTS = "trainable.safetensors"
OPTIM = "optim.pt"
CKPT_FILES = (WEIGHTS, OPTIM, CKPT_STATE, CKPT_MARKER)
STEP_DIR = re.compile(r"step_(\d{6})")
TEMP_DIR = re.compile(r"\.step_\d{6}\.[A-Za-z0-9_]+\.tmp")  # what save_checkpoint fills before the rename


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored: incomplete, truncated, foreign or not plain data."""


def stage_checkpoints(out_dir: Path, stage_idx: int) -> Path:
    """The folder of one stage's checkpoints in a run directory."""
    return out_dir / "checkpoints" / f"stage{stage_idx}"


def checkpoint_path(out_dir: Path, stage_idx: int, step: int) -> Path:
    return stage_checkpoints(out_dir, stage_idx) / f"step_{step:06d}"


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Trainable weights, optimizer, scheduler and ``state`` at ``path``: whole or not at all."""
    from safetensors.torch import save_file

    from revmix.platform.models import trainable_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(model).items()}
        save_file(weights, str(tmp / WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM)
        (tmp / CKPT_STATE).write_text(json.dumps(state))
        sizes = {name: _synced_size(tmp / name) for name in (WEIGHTS, OPTIM, CKPT_STATE)}
        (tmp / CKPT_MARKER).write_text(json.dumps({"format": 1, "files": sizes}))
        _synced_size(tmp / CKPT_MARKER)
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder; gone already after the rename
    fsync_dir(path.parent)


def _synced_size(file: Path) -> int:
    fsync_path(file)
    return file.stat().st_size


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an earlier checkpoint of the same step (a replayed step) is replaced."""
    if not path.exists():
        os.replace(tmp, path)
        return
    foreign = [p.name for p in path.iterdir() if p.name not in CKPT_FILES or not p.is_file()]
    if foreign:  # only checkpoint files (even an unfinished checkpoint's) are ours to remove
        raise CheckpointError(
            f"refusing to replace {path}: it holds {', '.join(sorted(foreign))}, not a checkpoint's files"
        )
    old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None: it is one)."""
    try:
        marker = json.loads((path / CKPT_MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no {CKPT_MARKER} (written last): the checkpoint was never finished"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {CKPT_MARKER}: {e}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {CKPT_MARKER} says {size} (truncated or replaced)"
    return None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its ``state``."""
    from safetensors.torch import load_file

    from revmix.platform.models import load_trainable_state_dict

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        load_trainable_state_dict(model, load_file(str(path / WEIGHTS)))
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None
    try:  # tensors and plain values only: unpickling anything else could run code
        opt = torch.load(path / OPTIM, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}/{OPTIM}: not plain tensors and values ({e})") from None
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / CKPT_STATE).read_text())


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in ``root``, oldest first (incomplete or truncated ones are skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(p for p in found if checkpoint_problem(p) is None)


def latest_checkpoint(out_dir: Path, stage_idx: int) -> Path | None:
    """The newest complete checkpoint of a stage, or None."""
    done = complete_checkpoints(stage_checkpoints(out_dir, stage_idx))
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep_last: int | None) -> list[Path]:
    """Remove all but the ``keep_last`` newest complete checkpoints in ``root``; returns the removed ones.

    Only complete checkpoints are removed: their marker proves the platform wrote them.
    """
    if keep_last is None:
        return []
    done = complete_checkpoints(root)
    removed = done[: max(len(done) - keep_last, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def remove_stale_temporaries(root: Path) -> None:
    """Remove what a killed :func:`save_checkpoint` left (its own temporary folder names only)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and TEMP_DIR.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
