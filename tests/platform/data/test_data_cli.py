"""``revmix data validate | synth | convert | reverse`` through ``revmix.cli.main`` (and once as a process)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from revmix.cli import main
from revmix.platform.data.loaders import load_jsonl, load_parquet, r1k_asset_path
from tests.platform.data.test_validate import good, write_lines


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    ok = write_lines(tmp_path / "ok.jsonl", [good("a"), good("a", "reverse")])
    bad = write_lines(
        tmp_path / "bad.jsonl", [good("a"), good("b", direction="up"), "{", good("c", "reverse")]
    )
    return ok, bad


def test_validate_good_file_exits_0(files: tuple[str, str], capsys: pytest.CaptureFixture) -> None:
    ok, _ = files
    assert main(["data", "validate", ok, "--require-pairs"]) == 0
    assert capsys.readouterr().out == f"{ok}: OK, 2 rows (1 forward, 1 reverse)\n"


def test_validate_bad_file_exits_1_and_prints_every_problem(
    files: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    ok, bad = files
    assert main(["data", "validate", ok, bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{ok}: OK, 2 rows (1 forward, 1 reverse)"
    assert out[1] == f"{bad}:2: direction: expected one of forward, reverse, got 'up'"
    assert out[2].startswith(f"{bad}:3: <line>: expected a JSON object, got invalid JSON (")
    assert out[3:] == [f"{bad}: 2 problem(s) in 2 of 4 rows", "1 of 2 files OK"]


def test_validate_require_pairs_and_missing_file(
    files: tuple[str, str], capsys: pytest.CaptureFixture
) -> None:
    _, bad = files
    assert main(["data", "validate", bad, "--require-pairs"]) == 1
    assert (
        f"{bad}:4: item_id: expected a valid forward twin with item_id 'c' (--require-pairs), found none"
        in capsys.readouterr().out
    )
    assert main(["data", "validate", str(Path(bad).with_name("nope.jsonl"))]) == 1
    assert "nope.jsonl:1: <file>: expected a readable row file" in capsys.readouterr().out


def test_validate_as_a_subprocess(files: tuple[str, str]) -> None:
    ok, bad = files
    exe = shutil.which("revmix") or str(Path(sys.executable).with_name("revmix"))
    cmd = [exe] if Path(exe).exists() else [sys.executable, "-m", "revmix.cli"]
    done = subprocess.run([*cmd, "data", "validate", ok, bad], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"{bad}:2: direction: expected one of forward, reverse, got 'up'" in done.stdout
    done = subprocess.run([*cmd, "data", "validate", ok], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, f"{ok}: OK, 2 rows (1 forward, 1 reverse)\n")


def test_data_without_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["data"]) == 2
    assert "validate" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ synth


def test_synth_list_and_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    synthetic = pytest.importorskip("revmix.platform.data.synthetic")
    assert main(["data", "synth", "--list"]) == 0
    assert capsys.readouterr().out.split() == list(synthetic.family_names())
    family = synthetic.family_names()[0]
    out = tmp_path / "syn.jsonl"
    assert main(["data", "synth", "--family", family, "--n", "5", "--seed", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 10 rows to {out}")
    assert load_jsonl(out, require_pairs=True).rows == synthetic.generate_mix([family], n=5, seed=2)
    assert main(["data", "validate", str(out), "--require-pairs"]) == 0


def test_synth_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("revmix.platform.data.synthetic")
    out = str(tmp_path / "x.jsonl")
    assert main(["data", "synth", "--family", "nope", "--n", "3", "--out", out]) == 2
    assert "unknown family ['nope']; valid: " in capsys.readouterr().err
    assert main(["data", "synth", "--n", "3"]) == 2
    assert "--family, --out required (or --list)" in capsys.readouterr().err
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------------- convert


def test_convert_r1k_sample_to_jsonl_and_parquet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if not r1k_asset_path().is_file():
        pytest.skip("r1k asset not vendored yet")
    out = tmp_path / "r1k.jsonl"
    assert main(["data", "convert", "r1k_sample", "--out", str(out)]) == 0
    assert f"wrote 70 rows to {out}" in capsys.readouterr().out
    assert main(["data", "validate", str(out), "--require-pairs"]) == 0
    assert main(["data", "convert", str(out), "--out", str(tmp_path / "r1k.parquet")]) == 0
    assert load_parquet(tmp_path / "r1k.parquet").rows == load_jsonl(out).rows


def test_convert_bad_rows_exit_1_unless_skipping(
    files: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, bad = files
    out = tmp_path / "clean.jsonl"
    assert main(["data", "convert", bad, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: 2 problem(s) in 2 of 4 rows; nothing was loaded" in err
    assert not out.exists()
    assert main(["data", "convert", bad, "--out", str(out), "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 2 rows to {out} ({bad}: 2 rows (1 forward, 1 reverse), 2 rejected)" in printed
    assert f"rejected: {bad}:2: direction: expected one of forward, reverse, got 'up'" in printed
    assert [r["item_id"] for r in load_jsonl(out).rows] == ["a", "c"]


def test_convert_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", "convert", "x.jsonl", "--out", str(tmp_path / "x.csv")])
    assert info.value.code == 2
    assert "expected a .jsonl or .parquet file, got" in capsys.readouterr().err
    assert main(["data", "convert", "x.txt", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown data source 'x.txt'" in capsys.readouterr().err
    assert main(["data", "convert", "x.jsonl", "--field-map", "a=b", "--out", str(tmp_path / "x.jsonl")]) == 2


def test_convert_hf_with_field_map(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_lines(
        tmp_path / "s.jsonl", [{"id": "a", "q": "Q", "sol": "S", "direction": "forward", "task": "t"}]
    )
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "data",
                "convert",
                f"hf:{src}",
                "--field-map",
                "id=item_id,q=prompt,sol=response",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_jsonl(out).rows == [good("a", prompt="Q", response="S", answer=None)]
    assert main(["data", "convert", f"hf:{src}", "--field-map", "q", "--out", str(out)]) == 2
    assert "expected --field-map a=b[,c=d], got 'q'" in capsys.readouterr().err


def test_convert_exits_1_when_every_row_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_lines(tmp_path / "all_bad.jsonl", [{"a": 1}])
    out = tmp_path / "o.jsonl"
    assert main(["data", "convert", src, "--skip-invalid", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "expected at least one row to write" in err
    assert f"rejected: {src}:1: item_id: required field is missing" in err
    assert not out.exists()
