"""The run directory: what ``revmix train --out DIR`` may write, replace or remove, and nothing else.

A run directory carries ``revmix_run.json``, written by the platform when it creates the run (after every
check of the config and the data has passed, so a refused start leaves nothing behind). Only a directory
with that manifest is a run; an existing ``--out`` without it must be empty, so revmix never writes into,
let alone deletes from, a folder the user filled. Inside a run, what the platform replaces is checked
against its own layout first: ``model`` must be the link revmix made (to ``stages/<i>/model``, or to the
adapter stage ``stages/<i>`` of a LoRA run that saves no merged model).

``--resume`` continues the run that was started: the resolved config is compared with the run's
``config.yaml`` and any change is refused, naming its dotted paths. A few changes cannot alter what was
trained (threads, restarts, log cadence, checkpoint retention: :data:`HARMLESS`) and pass silently; a few
more are safe when asked for explicitly with ``--allow-change PATH`` (:data:`ALLOWED`: more steps,
checkpoint cadence, evaluation settings, ...).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from revmix.atomic import atomic_write
from revmix.config import ConfigError, ExperimentConfig, build_config, to_dict
from revmix.platform.storage import Store, as_store

MANIFEST = "revmix_run.json"
MANIFEST_KIND = "revmix-run"
FINAL_MODEL = "model"
FINAL_TARGET = re.compile(r"stages/\d+(/model)?")  # a full model, or an adapter stage folder

# Changes on --resume that cannot change what is trained: accepted without a flag.
HARMLESS = (
    "runtime.torch_threads",
    "runtime.max_failures",
    "runtime.cpus_per_worker",
    "runtime.release_host_memory",
    "stages.*.log_every",
    "checkpoint.keep_last",
)
# Changes on --resume that are safe when asked for with --allow-change PATH.
ALLOWED = (
    "stages.*.steps",  # more steps only, and only while no later stage has started
    "stages.*.checkpoint_every",
    "runtime.on_nonfinite",
    "runtime.storage_path",
    "eval.*",
    "name",
)


class RunDirError(RuntimeError):
    """``--out`` cannot be used as asked; nothing was written to it."""


class RunExistsError(RunDirError):
    """The output directory already holds a run and ``--resume`` was not given (or holds none to resume)."""


def is_run(out: Path | Store) -> bool:
    """Whether ``out`` holds a run the platform created (its manifest is there and is ours)."""
    try:
        manifest = json.loads(as_store(out).read_text(MANIFEST))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == MANIFEST_KIND


def check_out_dir(out: Store, resume: bool) -> None:
    """Refuse an ``--out`` the platform may not use, before anything is written to it."""
    out.check_reachable()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; nothing was written")
    if is_run(out):
        if not resume:
            raise RunExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose a new --out"
            )
        check_layout(out)
        return
    if resume:
        raise RunExistsError(f"--resume: {out} holds no revmix run to resume (no {MANIFEST})")
    if out.listdir():
        raise RunDirError(
            f"--out {out} is not empty and is not a revmix run (no {MANIFEST}); revmix writes only into a new "
            "or an empty directory, so nothing of yours is overwritten: choose a new --out. Nothing was written"
        )


def check_layout(store: Store) -> None:
    """Refuse to go on when a path the platform replaces holds something it did not make (the ``model``
    link of a local run; a run on a bucket has no link: its summary names the final model)."""
    if not store.is_local:
        return
    final = store.local_path(FINAL_MODEL)
    if final.is_symlink():
        if FINAL_TARGET.fullmatch(os.readlink(final).replace(os.sep, "/")):
            return
        what = f"a link to {os.readlink(final)}"
    elif final.exists():
        what = "a directory" if final.is_dir() else "a file"
    else:
        return
    raise RunDirError(
        f"{final} is {what}, not the link to stages/<i>/model (or stages/<i>) that revmix makes; revmix "
        "replaces only what it made: move it out of the run directory, then run again"
    )


def write_run(out: Store, cfg: ExperimentConfig, changes: list[str]) -> None:
    """Create (or, on resume, update) the run's ``config.yaml`` and manifest; the first writes to ``out``."""
    manifest = json.loads(out.read_text(MANIFEST)) if is_run(out) else None
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if manifest is None or changes:
        out.write("config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if manifest is None:
        manifest = {"kind": MANIFEST_KIND, "format": 1, "created": now, "resumes": []}
    else:
        manifest.setdefault("resumes", []).append({"at": now, "changed": changes})
    out.write(MANIFEST, json.dumps(manifest, indent=1))


def link_final_model(store: Store, target: str) -> None:
    """``<out>/model`` becomes the link to the last stage's model ``target`` (run-relative:
    ``stages/<i>/model``, or an adapter stage ``stages/<i>``); it may only replace such a link.

    Local runs only: object stores have no links (the summary's ``final_model`` names it there)."""
    check_layout(store)
    if not store.is_local:
        return
    out = store.local_path()
    tmp = out / f".{FINAL_MODEL}.{secrets.token_hex(4)}.tmp"
    if not FINAL_TARGET.fullmatch(target):
        raise ValueError(f"link_final_model: {target!r} is not stages/<i>/model or stages/<i>")
    tmp.symlink_to(Path(*target.split("/")))
    try:
        os.replace(tmp, out / FINAL_MODEL)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- resume


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path → leaf value of a plain config (list items of mappings by index; other lists are leaves)."""
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, v in items:
        out.update(flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    if isinstance(value, list):
        out[f"{prefix}.#items" if prefix else "#items"] = len(value)
    return out


def check_resume_config(out: Store, cfg: ExperimentConfig, allow: Iterable[str] = ()) -> list[str]:
    """Compare ``cfg`` with the run's stored config; returns the changed paths accepted, else raises."""
    try:
        raw = yaml.safe_load(out.read_text("config.yaml")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RunDirError(f"--resume: cannot read the run's config.yaml to compare with ({e})") from None
    try:  # a field added to the config after the run was stored reads as its default there
        stored = flatten(to_dict(build_config(raw)))
    except ConfigError:  # a field since removed or renamed: compare what was written
        stored = flatten(raw)
    new = flatten(to_dict(cfg))
    changed = sorted(p for p in set(stored) | set(new) if stored.get(p, "<absent>") != new.get(p, "<absent>"))
    allow = list(allow)
    refused, unflagged, accepted = [], [], []
    for path in changed:
        what = f"{path} ({_show(stored.get(path, '<absent>'))} → {_show(new.get(path, '<absent>'))})"
        if _matches(path, HARMLESS):
            accepted.append(path)
        elif not _matches(path, ALLOWED) or (why := _step_change_problem(out, path, stored, new)):
            refused.append(what if not _matches(path, ALLOWED) else f"{what}: {why}")
        elif _matches(path, allow):
            accepted.append(path)
        else:
            unflagged.append(what)
    if refused or unflagged:
        raise RunDirError(_resume_message(out, refused, unflagged))
    return accepted


def _step_change_problem(out: Store, path: str, stored: dict, new: dict) -> str:
    """Why a change of ``stages.<i>.steps`` is not safe ("" when it is)."""
    m = re.fullmatch(r"stages\.(\d+)\.steps", path)
    if m is None:
        return ""
    old, value = stored.get(path), new.get(path)
    if not isinstance(old, int) or not isinstance(value, int) or value < old:
        return "steps may only grow"
    later = [n for n in out.listdir("stages") if n.isdigit() and int(n) > int(m.group(1))]
    later += [
        n
        for n in out.listdir("checkpoints")
        if n.startswith("stage") and n[5:].isdigit() and int(n[5:]) > int(m.group(1))
    ]
    return "a later stage has already started" if later else ""


def _resume_message(out: Store, refused: list[str], unflagged: list[str]) -> str:
    lines = [f"--resume: the config differs from the run's {out.url('config.yaml')}:"]
    if refused:
        lines.append("  cannot change in a resumed run (start a new --out instead):")
        lines += [f"    {w}" for w in refused]
    if unflagged:
        lines.append("  safe to change only when asked for, with --allow-change PATH:")
        lines += [f"    {w}" for w in unflagged]
    lines.append(f"  paths --allow-change accepts: {', '.join(ALLOWED)}. Nothing was written")
    return "\n".join(lines)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------- metrics


def truncate_metrics(path: Path, stage: int, step: int) -> int:
    """Keep the records up to ``(stage, step)`` (where a resumed stage restarts) and drop torn lines.

    A record written after the checkpoint being resumed from is replayed, so it would be a duplicate; a
    line cut by a kill is not JSON and would merge with the next record. Returns the lines dropped.
    """
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    kept: list[bytes] = []
    for line in raw.splitlines():
        try:
            rec = json.loads(line)
            keep = (int(rec["stage"]), int(rec["step"])) <= (stage, step)
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + b"\n")
    text = b"".join(kept)
    if text != raw:
        atomic_write(path, text)
    return len(raw.splitlines()) - len(kept)
