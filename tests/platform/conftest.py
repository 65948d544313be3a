"""Fixtures shared by the platform tests."""

from __future__ import annotations

import pytest

from revmix.platform.data import synthetic
from revmix.platform.data.tokenize import tokenise_rows
from revmix.platform.models import load_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def tiny() -> tuple[str, object, list[dict]]:
    """(path, tokenizer, rows): the locally built random tiny model and 8 tokenised affine_mod items."""
    path = resolve_model_path(None, "tiny")
    tok = load_tokenizer(path)
    rows, _ = tokenise_rows(synthetic.generate("affine_mod", 8, seed=0), tok, 256)
    return path, tok, rows
