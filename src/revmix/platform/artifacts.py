"""A run's stage models: full model folders, or adapter chains (base + LoRA adapters), and reading them
back from the run's store.

A LoRA stage saves its adapter and chain (:class:`AdapterChain`); reading such a
stage from a bucket needs more than the stage's own folder: the chain file and every run folder it names
(earlier stages' adapters, an earlier full model). :func:`fetch_local` downloads exactly those, in the
run's layout, so :func:`revmix.platform.models.load_model` resolves them as on a local run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from revmix.platform.storage import Store, is_uri, local_copy, staging_dir

CHAIN_FILE = "revmix_chain.json"
ADAPTER_DIR = "adapter"
_CHAIN_FORMAT = 1


@dataclass(frozen=True)
class AdapterChain:
    """A model kept as a full base model plus LoRA adapters merged into it in order (oldest first).

    A LoRA stage saves only its adapter (``stages/<i>/adapter``, a few MB where the merged model takes
    GB) and this chain, ``stages/<i>/revmix_chain.json``; :func:`load_model` rebuilds the stage's model
    from it. ``adapters`` are run-relative folders (``stages/0/adapter``); ``base`` is run-relative when
    ``base_in_run`` (an earlier stage's full model, ``stages/0/model``), else a path, URI or hub id.
    Run-relative entries resolve against the run root, so a moved or downloaded run still loads.
    """

    base: str
    base_in_run: bool = False
    adapters: tuple[str, ...] = ()

    def extend(self, adapter: str) -> AdapterChain:
        return dataclasses.replace(self, adapters=(*self.adapters, adapter))

    def to_json(self) -> str:
        data = {"format": _CHAIN_FORMAT, "base": self.base, "base_in_run": self.base_in_run}
        return json.dumps({**data, "adapters": list(self.adapters)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> AdapterChain:
        """Parse a chain file's text; ``where`` names the file in errors."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e}); expected a revmix adapter chain") from None
        if not isinstance(data, dict) or data.get("format") != _CHAIN_FORMAT:
            raise ValueError(
                f"{where}: expected a mapping with format {_CHAIN_FORMAT} (a revmix adapter chain)"
            )
        base, in_run, adapters = data.get("base"), data.get("base_in_run"), data.get("adapters")
        if not isinstance(base, str) or not base or not isinstance(in_run, bool):
            raise ValueError(f"{where}: 'base' must be a non-empty string and 'base_in_run' a boolean")
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise ValueError(f"{where}: 'adapters' must be a list of run-relative folders")
        return cls(base, in_run, tuple(adapters))

    def in_run(self) -> list[str]:
        """The run-relative folders the chain reads: the base when it is in the run, and every adapter."""
        return ([self.base] if self.base_in_run else []) + list(self.adapters)


def is_adapter_stage(path: str | Path) -> bool:
    """Whether ``path`` is a stage folder holding an adapter chain (not a full model folder)."""
    return (Path(path) / CHAIN_FILE).is_file()


def read_chain(stage_dir: str | Path) -> AdapterChain:
    path = Path(stage_dir) / CHAIN_FILE
    return AdapterChain.from_json(path.read_text(), str(path))


def resolve_chain(path: str | Path) -> tuple[str, list[str]]:
    """``(base, adapter folders)`` to load for ``path``: itself and none for a full model or hub id."""
    if not is_adapter_stage(path):
        return str(path), []
    chain = read_chain(path)
    root = Path(os.path.realpath(path)).parent.parent  # stages/<i> -> the run (links resolved)
    base = str(root / chain.base) if chain.base_in_run else chain.base
    adapters = [str(root / a) for a in chain.adapters]
    for folder in ([base] if chain.base_in_run else []) + adapters:
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"{Path(path) / CHAIN_FILE}: the chain needs {folder}, which is missing; the run's earlier "
                "stages must stay next to this one"
            )
    return base, adapters


@contextlib.contextmanager
def fetch_local(store: Store, rel: str) -> Iterator[Path]:
    """A local folder holding the run's ``rel`` (a model, an adapter stage or a checkpoint): the folder
    itself on a local run; on a bucket, a temporary download removed afterwards."""
    if store.is_local:
        yield store.local_path(rel)
        return
    work = staging_dir("fetch")
    try:
        if store.is_file(f"{rel}/{CHAIN_FILE}"):
            with _fetch_chain(store, rel, work) as stage:
                yield stage
        else:
            yield store.download(rel, work / Path(rel).name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _fetch_chain(store: Store, rel: str, work: Path) -> Iterator[Path]:
    """The chain's run folders downloaded under ``work`` in the run's layout; a base on another bucket
    downloaded too, and the local chain file rewritten to name that copy."""
    chain = AdapterChain.from_json(store.read_text(f"{rel}/{CHAIN_FILE}"), store.url(f"{rel}/{CHAIN_FILE}"))
    for item in chain.in_run():
        store.download(item, work / item)
    with contextlib.ExitStack() as stack:
        if not chain.base_in_run and is_uri(chain.base):
            chain = dataclasses.replace(chain, base=str(stack.enter_context(local_copy(chain.base))))
        (work / rel).mkdir(parents=True, exist_ok=True)
        (work / rel / CHAIN_FILE).write_text(chain.to_json())
        yield work / rel
