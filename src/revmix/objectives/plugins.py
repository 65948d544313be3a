"""Finding plug-in objectives: installed ones by entry point, any other by its import path.

A config names an objective that is not built in (:mod:`revmix.objectives.builtins`) in one of two ways:

* ``"pkg.module:ClassName"`` — :func:`import_path` imports ``pkg.module`` and takes ``ClassName``;
* a short name that an installed distribution declares in the entry-point group ``revmix.objectives``
  (``[project.entry-points."revmix.objectives"]`` in its ``pyproject.toml``) — :func:`installed` is the
  lazy name → loader table of that group (in the style of Ray Tune's search-algorithm table): reading it
  imports nothing; a plug-in's module is imported only when its loader is called, i.e. when it is named.

This module only finds objects; :func:`revmix.objectives.base.objective_class` decides whether what it
found is an objective (``revmix.objectives.base`` imports this module, so it knows nothing of objectives).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from typing import Any

from revmix.validation import did_you_mean

OBJECTIVES_GROUP = "revmix.objectives"
"""The entry-point group installed packages declare their objectives in."""


class PluginError(LookupError):
    """A plug-in that cannot be found: a malformed path, a module that does not import, a missing name."""


def installed(group: str = OBJECTIVES_GROUP) -> dict[str, Callable[[], Any]]:
    """Name → loader of every entry point of ``group``; calling a loader imports its module and returns the
    object (a failing import raises :class:`PluginError` naming the entry point)."""
    return {ep.name: _loader(ep) for ep in importlib.metadata.entry_points(group=group)}


def _loader(ep: importlib.metadata.EntryPoint) -> Callable[[], Any]:
    def load() -> Any:
        try:
            return ep.load()
        except (ImportError, AttributeError) as e:
            dist = f" of {ep.dist.name}" if ep.dist is not None else ""
            raise PluginError(
                f"installed plug-in {ep.name!r}{dist} (entry point {ep.name} = {ep.value!r} in group "
                f"{ep.group!r}) failed to load: {type(e).__name__}: {e}"
            ) from e

    return load


def import_path(path: str) -> Any:
    """The object ``pkg.module:Name`` stands for (``Name`` may be dotted: ``Outer.Inner``).

    The working directory is searched after ``sys.path`` (as ``python -m`` would, which the ``revmix``
    console script does not), so ``revmix objectives check my_objective:MyObjective`` finds
    ``./my_objective.py``; Ray workers search the driver's working directory too.

    Raises :class:`PluginError` for a malformed path, a module that cannot be imported (install it, or
    put its directory on ``PYTHONPATH``) and a missing attribute (with close matches). Other errors raised
    while the module runs are bugs in the plug-in and propagate with their traceback.
    """
    module_name, sep, attr = path.partition(":")
    parts = [*module_name.split("."), *attr.split(".")]
    if not sep or ":" in attr or not all(p.isidentifier() for p in parts):
        raise PluginError(f"{path!r} is not an import path pkg.module:ClassName")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # appended: never shadows an installed package
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(
            f"cannot import module {module_name!r} of {path!r} ({type(e).__name__}: {e}); install its "
            "package or put its directory on PYTHONPATH"
        ) from e
    found: Any = module
    for i, name in enumerate(attr.split(".")):
        try:
            found = getattr(found, name)
        except AttributeError:
            owner = ".".join([module_name, *attr.split(".")[:i]])
            public = [n for n in dir(found) if not n.startswith("_")]
            raise PluginError(f"{owner!r} has no attribute {name!r}{did_you_mean(name, public)}") from None
    return found
