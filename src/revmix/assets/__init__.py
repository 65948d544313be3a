"""Data files shipped inside the package (benchmarks, the paper's sample pairs); see ``SOURCES.md``.

They are read through ``importlib.resources`` so that they resolve the same way from a source checkout, an
editable install, a wheel, or a Ray ``working_dir`` copy, without depending on the current directory.
"""

from __future__ import annotations

import pathlib
from importlib import resources


def asset_names() -> list[str]:
    """Names of the shipped data files (``.jsonl`` and ``.md``), sorted."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".md")))


def asset_path(name: str) -> pathlib.Path:
    """Filesystem path of the shipped asset ``name`` (e.g. ``"math500_test.jsonl"``).

    Raises FileNotFoundError listing the available assets when ``name`` is not one of them. The package is
    always installed unzipped (setuptools, editable or wheel), so the resource is a real file on disk.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise FileNotFoundError(
            f"asset name must be a bare file name, got {name!r}; available: {asset_names()}"
        )
    resource = resources.files(__name__) / name
    if not resource.is_file():
        raise FileNotFoundError(f"no asset {name!r} in revmix.assets; available: {asset_names()}")
    return pathlib.Path(str(resource))
