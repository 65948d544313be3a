"""Bad training data is refused before training, named ``FILE:LINE``, with nothing written to ``--out``.

Each case drives ``revmix train`` in this process (no training happens: the data is checked first) and
asserts the exit code, the place named in the message, that ``--out`` was not created and that no
temporary file was left next to the data. The loader- and prepare-level cases check the same rules
without the CLI, including ``data.skip_invalid``, which leaves such rows out and counts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.config import load_config
from revmix.platform.data import loaders
from revmix.platform.data.loaders import DataError, load_rows, write_jsonl
from revmix.platform.data.prepare import prepare_data
from revmix.platform.data.synthetic import generate_mix, split_by_item
from revmix.platform.models import load_tokenizer, resolve_model_path
from revmix.platform.train import check_mix

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "configs" / "runs"
SFT, DPO, UL = RUNS / "sft_tiny.yaml", RUNS / "dpo_tiny.yaml", RUNS / "unlikelihood_tiny.yaml"


def _rows(n_items: int = 10) -> list[dict]:
    return generate_mix(["affine_mod"], n_items, seed=0)


def _write(path: Path, lines: list[bytes | str | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = [
        x if isinstance(x, bytes) else (json.dumps(x) if isinstance(x, dict) else x).encode() for x in lines
    ]
    path.write_bytes(b"".join(r + b"\n" for r in raw))
    return path


def _refused(capsys, tmp_path: Path, config: Path, source: Path | str, *overrides: str) -> str:
    """``revmix train`` on ``source``: asserts exit 2, no --out, nothing new by the data; returns stderr."""
    out = tmp_path / "out"
    data_dir = Path(str(source)).parent
    before = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    code = main(
        ["train", str(config), f"data.source={source}", "stages.0.steps=2", *overrides, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not out.exists()
    after = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    assert after == before  # no temporary file left behind
    return err


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None, "tiny"))


# ------------------------------------------------------------------------------------- encodings


LAZY = "data.stream_threshold_rows=0"  # a local file above the threshold is read lazily, never loaded whole
PATHS = pytest.mark.parametrize("path", [[], [LAZY]], ids=["loaded", "lazy"])


@PATHS
def test_invalid_utf8_names_the_line_and_byte(tmp_path, capsys, path):
    rows = _rows(3)
    f = _write(tmp_path / "d" / "rows.jsonl", [rows[0], rows[1], b'{"prompt": "caf\xe9"}', *rows[2:]])
    err = _refused(capsys, tmp_path, SFT, f, *path)
    assert (
        f"{f}:3: <line>: expected a JSON object, got invalid JSON (invalid UTF-8: byte 0xe9 at position 15)"
        in err
    )


@PATHS
def test_a_lone_surrogate_names_the_line_and_field(tmp_path, capsys, path):
    rows = _rows(3)
    lines: list[bytes | str | dict] = [rows[0], rows[1]]
    lines.append(json.dumps(rows[2]).replace('"prompt": "Let', '"prompt": "\\ud83dLet'))
    f = _write(tmp_path / "d" / "rows.jsonl", [*lines, *rows[3:]])
    err = _refused(capsys, tmp_path, SFT, f, *path)
    assert f"{f}:3: prompt: expected text, got a lone surrogate \\ud83d at character 0" in err


def test_a_byte_order_mark_is_not_a_problem(tmp_path):
    rows = _rows(2)
    f = _write(tmp_path / "rows.jsonl", [b"\xef\xbb\xbf" + json.dumps(rows[0]).encode(), *rows[1:]])
    assert len(load_rows(str(f)).rows) == len(rows)


# ----------------------------------------------------------------------------------- empty or unreadable


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "expected at least one row, found none"),
        ("blank.jsonl", b"\n  \n\n", "expected at least one row, found none"),
        ("empty.json", b"[]", "expected at least one row, found none"),
        ("object.json", b'[{"a": 1}', "expected a readable row file"),
        ("empty.parquet", b"", "expected a readable row file"),
        ("text.parquet", b"not parquet", "expected a readable row file"),
    ],
)
@PATHS
def test_empty_or_unreadable_files_are_named(tmp_path, capsys, name, content, message, path):
    f = tmp_path / "d" / name
    f.parent.mkdir()
    f.write_bytes(content)
    err = _refused(capsys, tmp_path, SFT, f, *path)
    assert f"{f}:1: <file>: {message}" in err


def test_a_missing_file_is_named(tmp_path, capsys):
    f = tmp_path / "d" / "nowhere.jsonl"
    err = _refused(capsys, tmp_path, SFT, f)
    assert f"{f}:1: <file>: expected a readable row file" in err and "No such file" in err


# ------------------------------------------------------------------------------------- pair objectives


@pytest.mark.parametrize(
    ("config", "who"), [(DPO, "stages.1.objective (dpo)"), (UL, "stages.0.objective (unlikelihood)")]
)
def test_pair_objectives_name_every_row_without_other_response(tmp_path, capsys, config, who):
    rows = _rows(10)
    rows[3]["other_response"] = None
    del rows[7]["other_response"]
    rows[12]["other_response"] = "  "
    f = _write(tmp_path / "d" / "pairs.jsonl", list(rows))
    err = _refused(capsys, tmp_path, config, f, "stages.1.steps=2" if config == DPO else "seed=0")
    for line, got in ((4, "null"), (8, "null"), (13, "'  '")):
        assert f"{f}:{line}: other_response: expected a non-empty string ({who} trains on" in err
        assert f"pairs), got {got}" in err
    assert "3 problem(s) in 3 of 20 rows" in err


def test_sft_does_not_need_other_response(tmp_path, tokenizer):
    rows = [{k: v for k, v in r.items() if k != "other_response"} for r in _rows(10)]
    cfg = load_config(SFT, [f"data.source={_write(tmp_path / 'rows.jsonl', list(rows))}"])
    assert prepare_data(cfg.data, tokenizer).rejected == 0


def test_skip_invalid_leaves_rows_without_pairs_out_and_counts_them(tmp_path, tokenizer):
    rows = _rows(10)
    rows[3]["other_response"] = None
    f = _write(tmp_path / "pairs.jsonl", list(rows))
    cfg = load_config(DPO, [f"data.source={f}", "data.skip_invalid=true"])
    data = prepare_data(cfg.data, tokenizer, pairs_needed_by="stages.1.objective (dpo)")
    assert data.rejected == 1
    assert sum(len(v) for v in data.train.values()) + len(data.test_rows) == 19


# --------------------------------------------------------------------------------------- long prompts


def _with_long_prompts(n: int) -> list[dict]:
    """Ten items; the prompts of the first ``n`` training rows (by the default split) are far too long."""
    rows = _rows(10)
    _, test = split_by_item(rows, 0.2, seed=0)  # data.test_fraction and data.seed of sft_tiny.yaml
    held_out = {r["item_id"] for r in test}
    for r in [r for r in rows if r["item_id"] not in held_out][:n]:
        r["prompt"] = "word " * 300
    return rows


def test_prompts_longer_than_max_length_name_their_lines(tmp_path, capsys):
    rows = _with_long_prompts(2)
    f = _write(tmp_path / "d" / "rows.jsonl", list(rows))
    err = _refused(capsys, tmp_path, SFT, f)
    lines = [i + 1 for i, r in enumerate(rows) if r["prompt"].startswith("word")]
    for line in lines:
        assert f"{f}:{line}: prompt: the prompt is" in err
    assert "data.max_length 256 leaves no room for a response: raise data.max_length to at least" in err


def test_skip_invalid_leaves_long_prompts_out_and_counts_them(tmp_path, tokenizer):
    f = _write(tmp_path / "rows.jsonl", list(_with_long_prompts(2)))
    cfg = load_config(SFT, [f"data.source={f}", "data.skip_invalid=true"])
    data = prepare_data(cfg.data, tokenizer)
    assert data.rejected == 2
    assert sum(len(v) for v in data.train.values()) == 16 - 2


def test_skip_invalid_accounts_for_every_row_read(tmp_path, tokenizer):
    """Count in = count out + rejected, over every kind of rejection at once (hand-counted)."""
    rows = _with_long_prompts(2)  # 20 rows; 2 training prompts too long for max_length
    rows[19]["other_response"] = None  # no pair for DPO
    missing = {k: v for k, v in rows[0].items() if k != "response"}
    lines: list[bytes | str | dict] = [*rows, b"{not json", missing, dict(rows[1])]  # bad, missing, duplicate
    f = _write(tmp_path / "rows.jsonl", lines)
    cfg = load_config(DPO, [f"data.source={f}", "data.skip_invalid=true", f"data.cache_dir={tmp_path / 'c'}"])
    data = prepare_data(cfg.data, tokenizer, pairs_needed_by="stages.1.objective (dpo)")
    out = sum(len(v) for v in data.train.values()) + len(data.test_rows)
    assert data.rejected == 1 + 1 + 1 + 1 + 2  # bad JSON, missing response, duplicate, no pair, long prompts
    assert out + data.rejected == 23


# ---------------------------------------------------------------------------------- the mix and the data


def test_a_mix_that_asks_for_a_missing_direction_is_refused(tmp_path, capsys):
    forward_only = [r for r in _rows(10) if r["direction"] == "forward"]
    f = _write(tmp_path / "d" / "forward.jsonl", list(forward_only))
    err = _refused(capsys, tmp_path, SFT, f)
    assert "stages.0.mix: the stage draws" in err and "reverse examples" in err
    assert "has no reverse rows (8 forward, 0 reverse)" in err and "stages.0.mix.reverse_fraction=0" in err


def test_a_mix_that_needs_only_the_present_direction_passes(tmp_path, tokenizer):
    forward_only = [r for r in _rows(10) if r["direction"] == "forward"]
    f = _write(tmp_path / "forward.jsonl", list(forward_only))
    cfg = load_config(SFT, [f"data.source={f}", "stages.0.mix.reverse_fraction=0", "stages.0.steps=3"])
    check_mix(cfg, prepare_data(cfg.data, tokenizer))  # no error
    cfg = load_config(SFT, [f"data.source={f}", "stages.0.mix.mode=union", "stages.0.steps=3"])
    check_mix(cfg, prepare_data(cfg.data, tokenizer))


# ------------------------------------------------------------------------------------ writers


def test_a_failed_write_leaves_no_temporary_file_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "rows.jsonl"
    write_jsonl(_rows(2), target)
    before = target.read_bytes()
    calls = {"n": 0}
    real_dumps = json.dumps

    def failing_dumps(obj, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_dumps(obj, **kw)

    monkeypatch.setattr(json, "dumps", failing_dumps)
    with pytest.raises(OSError, match="No space left"):
        write_jsonl(_rows(4), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    assert target.read_bytes() == before


def test_a_data_error_lists_the_train_flag(tmp_path):
    f = _write(tmp_path / "rows.jsonl", [{"item_id": "a"}])
    with pytest.raises(DataError, match="data.skip_invalid=true in a run config"):
        loaders.load_jsonl(f)
