"""Read back what the trackers wrote, with each format's own reader where one is installed.

- TensorBoard: ``tensorboard`` (and its EventAccumulator) is not installed; tensorboardX ships the
  ``Event`` protobuf, so the event file's TFRecord framing (length, CRC, payload, CRC) is read here.
- W&B: wandb 0.31 ships no reader for its ``.wandb`` files; they are a LevelDB-style log (a 7-byte
  header, 32 KiB blocks of records with a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) of
  ``wandb_internal_pb2.Record`` protobufs, which wandb does ship.
- MLflow: ``MlflowClient`` on the SQLite store.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file under ``logdir`` (a later file wins a step)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


_BLOCK, _HEADER = 32768, 7


def wandb_records(run_file: Path) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run file"
    pos, chunk, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(Record.FromString(chunk))
            chunk = b""
    return records


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The ``run.log`` rows of a ``.wandb`` file (with W&B's ``_step``)."""
    rows = []
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in rec.history.item
                }
            )
    return rows


def wandb_run(run_file: Path) -> Any:
    """The ``RunRecord`` (project, group, display name, config) of a ``.wandb`` file."""
    runs = [rec.run for rec in wandb_records(run_file) if rec.WhichOneof("record_type") == "run"]
    assert runs, f"{run_file}: no run record"
    return runs[0]


def series_by_step(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["_step"]): float(r[key]) for r in rows if key in r}
