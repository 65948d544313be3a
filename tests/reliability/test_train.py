"""`revmix train` under faults and bad inputs: nothing the user owns is lost, checkpoints are trusted only when
whole, a resume continues exactly what was started, and a diverging run stops at the step that diverged.

Most cases are refusals that happen before any training (in-process ``revmix`` calls, seconds each). The
end-to-end cases share one short run through the CLI (``good_run``), which they copy and damage: a kill
after the last checkpoint, a half-written checkpoint, a torn metrics line, a user's folder where the run's
``model`` link was.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from revmix.cli import main
from revmix.config import StageConfig
from revmix.objectives.base import LossOutput
from revmix.platform.artifacts import ADAPTER_DIR, CHAIN_FILE
from revmix.platform.checkpoint import (
    CKPT_MARKER,
    CheckpointError,
    checkpoint_problem,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from revmix.platform.data.synthetic import generate_mix
from revmix.platform.run_dir import MANIFEST, flatten, truncate_metrics
from revmix.platform.step import SKIPPED, NonFiniteStep, StepContext, supervised_step

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "configs" / "runs" / "sft_tiny.yaml"
SHORT = ["stages.0.batch_size=8", "stages.0.warmup_steps=1", "stages.0.checkpoint_every=1"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``revmix ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "revmix.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``revmix train ARGS`` in this process: (exit code, stderr)."""
    code = main(["train", *args])
    return code, capsys.readouterr().err


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tree(path: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under ``path``: what "nothing changed" compares."""
    out: dict[str, bytes | str] = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


# ------------------------------------------------------------------------------------ the shared run


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 4-step run from a JSONL file into an existing empty --out, keeping 2 checkpoints.

    Its first start is refused (line 3 of the data is not UTF-8); the user fixes the line and runs the
    very same command again, which must not be refused as "already a run".
    """
    base = tmp_path_factory.mktemp("good")
    rows = generate_mix(["affine_mod"], 40, seed=0)
    data = base / "data" / "rows.jsonl"
    data.parent.mkdir()
    lines = [json.dumps(r).encode() for r in rows]
    data.write_bytes(b"\n".join([*lines[:2], b'{"item_id": "\xff"}', *lines[3:]]) + b"\n")
    out = base / "run"
    out.mkdir()  # an empty directory is a fine --out
    overrides = [f"data.source={data}", *SHORT, "stages.0.steps=4", "checkpoint.keep_last=2"]
    args = ["train", str(SFT), *overrides, "--no-eval", "--out", str(out)]
    refused = _cli(*args)
    refused_left = sorted(p.name for p in out.iterdir()), sorted(p.name for p in data.parent.iterdir())
    data.write_bytes(b"\n".join(lines) + b"\n")
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return SimpleNamespace(
        out=out, overrides=overrides, refused=refused, refused_left=refused_left, summary=summary
    )


def _copy(good_run: SimpleNamespace, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(good_run.out, run, symlinks=True)
    return run


def _resume_args(good_run: SimpleNamespace, run: Path, overrides=(), flags=()) -> list[str]:
    """The good run's command with ``--resume`` (and more overrides and flags) on the copy ``run``."""
    return [str(SFT), *good_run.overrides, *overrides, "--no-eval", "--out", str(run), "--resume", *flags]


def test_a_refused_start_writes_nothing_and_the_identical_rerun_runs(good_run):
    refused = good_run.refused
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "rows.jsonl:3: <line>" in refused.stderr and "invalid UTF-8: byte 0xff" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert good_run.refused_left == ([], ["rows.jsonl"])  # nothing in --out, no temporary file by the data
    assert good_run.summary["steps"] == 4 and good_run.summary["final"]["step"] == 4


def test_the_run_is_marked_and_keeps_its_last_checkpoints(good_run):
    out = good_run.out
    assert json.loads((out / MANIFEST).read_text())["kind"] == "revmix-run"
    kept = complete_checkpoints(out / "checkpoints" / "stage0")
    assert [p.name for p in kept] == ["step_000003", "step_000004"]  # checkpoint.keep_last=2
    assert os.readlink(out / "model") == os.path.join("stages", "0")  # a LoRA run: the adapter stage
    optim = torch.load(kept[-1] / "optim.pt", weights_only=True)  # tensors and plain values only
    assert set(optim) == {"optimizer", "scheduler"}
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["last"]["step"] == 4 and state["last"]["loss"] == good_run.summary["final"]["loss"]
    assert [(r["stage"], r["step"]) for r in _records(out)] == [(0, s) for s in (1, 2, 3, 4)]


# ------------------------------------------------------------------------ nothing the user owns is lost


def test_a_folder_that_is_not_a_run_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"precious")
    before = _tree(out)
    code, err = _train(capsys, str(SFT), "stages.0.steps=2", "--out", str(out))
    assert code == 2
    assert str(out) in err and "not a revmix run" in err and "Nothing was written" in err
    assert _tree(out) == before


@pytest.mark.parametrize(
    ("setup", "flags", "message"),
    [
        ("file", [], "is a file, not a directory"),
        ("empty", ["--resume"], "holds no revmix run to resume"),
        ("missing", ["--resume"], "holds no revmix run to resume"),
        ("empty", ["--allow-change", "stages.0.steps"], "--allow-change is for --resume"),
    ],
)
def test_out_dirs_that_cannot_be_used_are_refused(tmp_path, capsys, setup, flags, message):
    out = tmp_path / "out"
    if setup == "file":
        out.write_text("notes")
    elif setup == "empty":
        out.mkdir()
    code, err = _train(capsys, str(SFT), "stages.0.steps=2", "--out", str(out), *flags)
    assert code == 2 and message in err
    if setup == "file":
        assert out.read_text() == "notes"
    else:
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["folder", "link elsewhere"])
def test_what_the_user_put_where_the_model_link_was_is_never_replaced(good_run, tmp_path, capsys, kind):
    run = _copy(good_run, tmp_path)
    (run / "model").unlink()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    if kind == "folder":
        shutil.copytree(mine, run / "model")
    else:
        (run / "model").symlink_to(mine)
    before = _tree(run)
    code, err = _train(capsys, *_resume_args(good_run, run))
    assert code == 2
    what = "a directory" if kind == "folder" else f"a link to {mine}"
    assert f"{run / 'model'} is {what}" in err and "move it out" in err
    assert _tree(run) == before and (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("override", "path", "message"),
    [
        ("stages.0.lr=inf", "stages.0.lr", "finite"),
        ("stages.0.lr=nan", "stages.0.lr", "finite"),
        ("stages.0.lr=0", "stages.0.lr", "> 0"),
        ("stages.0.steps=-1", "stages.0.steps", ">= 1"),
        ("stages.0.steps=0", "stages.0.steps", ">= 1"),
        ("stages.0.epochs=0", "stages.0.epochs", "> 0"),
        ("stages.0.max_grad_norm=-1", "stages.0.max_grad_norm", ">= 0"),
        ("stages.0.mix.schedule.start=2", "stages.0.mix.schedule.start", "[0, 1]"),
        ("stages.0.batch_size=0", "stages.0.batch_size", ">= 1"),
        ("runtime.torch_threads=-2", "runtime.torch_threads", ">= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
        ("runtime.on_nonfinite=ignore", "runtime.on_nonfinite", "stop, skip_step"),
    ],
)
def test_bad_numbers_exit_2_naming_the_path_and_write_nothing(tmp_path, capsys, override, path, message):
    out = tmp_path / "out"
    code, err = _train(capsys, str(SFT), override, "--out", str(out))
    assert code == 2 and path in err and message in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- resume


ALLOW_STEPS = ["--allow-change", "stages.0.steps"]


@pytest.mark.parametrize(
    ("overrides", "flags", "wanted"),
    [
        (["stages.0.lr=0.001"], [], ["stages.0.lr (0.003 → 0.001)", "cannot change in a resumed run"]),
        (["stages.0.lr=0.001"], ["--allow-change", "stages.0.lr"], ["stages.0.lr (0.003 → 0.001)", "cannot"]),
        (["stages.0.steps=6"], [], ["stages.0.steps (4 → 6)", "--allow-change PATH"]),
        (["stages.0.steps=3"], ALLOW_STEPS, ["stages.0.steps (4 → 3): steps may only grow"]),
        (["data.test_fraction=0.5", "seed=3"], [], ["data.test_fraction (0.2 → 0.5)", "seed (0 → 3)"]),
    ],
)
def test_resume_refuses_a_changed_config_naming_the_paths(
    good_run, tmp_path, capsys, overrides, flags, wanted
):
    run = _copy(good_run, tmp_path)
    before = _tree(run)
    code, err = _train(capsys, *_resume_args(good_run, run, overrides, flags))
    assert code == 2
    for text in wanted:
        assert text in err, err
    assert _tree(run) == before  # config.yaml and the manifest untouched


def _kill_after_last_checkpoint(run: Path) -> None:
    """What a kill between the stage's last checkpoint and the end of the stage leaves on disk."""
    shutil.rmtree(run / "stages" / "0")
    (run / "summary.json").unlink()
    (run / "model").unlink()


def test_resume_after_the_last_checkpoint_writes_a_complete_summary(good_run, tmp_path):
    run = _copy(good_run, tmp_path)
    _kill_after_last_checkpoint(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": 0, "step": 5, "lo')  # a line torn by the kill
    done = _cli("train", *_resume_args(good_run, run))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    final = good_run.summary["final"]
    assert summary["final"]["step"] == 4 and summary["final"]["loss"] == final["loss"]
    assert summary["stages"][0]["tokens"] == good_run.summary["stages"][0]["tokens"]
    assert [(r["stage"], r["step"]) for r in _records(run)] == [(0, s) for s in (1, 2, 3, 4)]
    assert (run / "model" / CHAIN_FILE).exists() and (
        run / "model" / ADAPTER_DIR
    ).is_dir()  # the adapter stage


def test_a_half_written_checkpoint_is_skipped_and_the_stage_may_grow_when_asked(good_run, tmp_path):
    """The newest checkpoint is truncated: the run resumes from the one before, replays its step with no
    duplicate record, and trains the 2 extra steps the user allowed."""
    run = _copy(good_run, tmp_path)
    _kill_after_last_checkpoint(run)
    weights = run / "checkpoints" / "stage0" / "step_000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = _cli("train", *_resume_args(good_run, run, ["stages.0.steps=6"], ALLOW_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(run)
    assert [(r["stage"], r["step"]) for r in records] == [(0, s) for s in range(1, 7)]
    original = {r["step"]: r for r in _records(good_run.out)}
    assert records[3]["loss"] == pytest.approx(original[4]["loss"], rel=1e-5)  # step 4 replayed exactly
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final"]["step"] == 6
    manifest = json.loads((run / MANIFEST).read_text())
    assert manifest["resumes"][-1]["changed"] == ["stages.0.steps"]
    names = sorted(p.name for p in (run / "checkpoints" / "stage0").iterdir())
    assert names == ["step_000005", "step_000006"]  # keep_last=2; the truncated one was replaced, then pruned


# ----------------------------------------------------------------------------- a diverging run stops


def test_a_non_finite_loss_stops_the_run_at_that_step_keeping_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    overrides = ["data.n_items=40", *SHORT, "stages.0.steps=4", "stages.0.lr=1e30", "stages.0.warmup_steps=0"]
    done = _cli("train", str(SFT), *overrides, "--no-eval", "--out", str(out))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "stage 0 (sft), step 2/4: non-finite loss nan" in done.stderr
    assert "runtime.on_nonfinite=skip_step" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in complete_checkpoints(out / "checkpoints" / "stage0")] == ["step_000001"]
    assert f"Last good checkpoint: {out / 'checkpoints' / 'stage0' / 'step_000001'}" in done.stderr
    assert [r["step"] for r in _records(out)] == [1]
    assert not (out / "summary.json").exists() and not (out / "model").exists()


# ------------------------------------------------------------------------- checkpoints, without training


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(3, 2)


def _optim(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _checkpoint(root: Path, step: int) -> Path:
    model = _Model()
    opt, sched = _optim(model)
    model.w.weight.grad = torch.ones_like(model.w.weight)
    opt.step()
    path = root / f"step_{step:06d}"
    save_checkpoint(path, model, opt, sched, {"mixer": {"step": step}, "last": {"step": step}})
    return path


def test_checkpoints_are_whole_or_skipped(tmp_path):
    root = tmp_path / "checkpoints" / "stage0"
    first, second, third = (_checkpoint(root, s) for s in (1, 2, 3))
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    (third / CKPT_MARKER).unlink()  # never finished
    weights = second / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated copy
    assert "never finished" in (checkpoint_problem(third) or "")
    assert "truncated" in (checkpoint_problem(second) or "")
    assert latest_checkpoint(tmp_path, 0) == first
    model = _Model()
    with pytest.raises(CheckpointError, match="never finished"):
        load_checkpoint(third, model, *_optim(model))
    assert load_checkpoint(first, model, *_optim(model))["last"] == {"step": 1}


def test_keep_last_prunes_only_complete_checkpoints(tmp_path):
    root = tmp_path / "ck"
    paths = [_checkpoint(root, s) for s in (1, 2, 3, 4)]
    (paths[0] / CKPT_MARKER).unlink()  # not proven complete: left alone
    removed = prune_checkpoints(root, keep_last=2)
    assert [p.name for p in removed] == ["step_000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000003", "step_000004"]
    assert prune_checkpoints(root, keep_last=None) == []


class _Exploit:
    """A pickle that runs code when loaded (what an untrusted optim.pt could hold)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.write_text, (self.flag, "code ran"))


def test_a_checkpoint_cannot_run_code(tmp_path):
    path = _checkpoint(tmp_path, 1)
    flag = tmp_path / "pwned"
    with open(path / "optim.pt", "wb") as f:
        pickle.dump({"optimizer": _Exploit(flag), "scheduler": {}}, f, protocol=2)
    marker = json.loads((path / CKPT_MARKER).read_text())
    marker["files"]["optim.pt"] = (path / "optim.pt").stat().st_size
    (path / CKPT_MARKER).write_text(json.dumps(marker))
    model = _Model()
    with pytest.raises(CheckpointError, match="not plain tensors"):
        load_checkpoint(path, model, *_optim(model))
    assert not flag.exists()


def test_metrics_are_cut_to_the_checkpoint_and_torn_lines_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"stage": 0, "step": s} for s in (1, 2, 3)] + [{"stage": 1, "step": s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"stage": 1, "st')
    assert truncate_metrics(path, 1, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:5]
    assert truncate_metrics(path, 1, 2) == 0  # nothing left to cut: the file is not rewritten


def test_config_paths_flatten_list_items_by_index():
    flat = flatten({"stages": [{"lr": 1, "mix": {"r": 0.5}}], "data": {"families": ["a", "b"]}})
    assert flat == {"stages.0.lr": 1, "stages.0.mix.r": 0.5, "stages.#items": 1, "data.families": ["a", "b"]}


# ------------------------------------------------------------------------ the step's non-finite guard


class _ScaledSum:
    """An objective whose loss is ``factor × Σ weights`` (``factor`` nan or inf makes the step non-finite)."""

    requires = frozenset({"response"})

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, model, batch, ref=None):
        loss = model.w.weight.sum() * self.factor
        return LossOutput(loss=loss, metrics={"loss": float(loss.detach())})


def _step(factor: float, on_nonfinite: str, max_grad_norm: float = 1.0):
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    row = {"prompt_ids": [1, 2], "response_ids": [3, 4], "other_ids": [], "direction": 0}
    rows = [{**row, "task": "t", "answer": None, "item_id": str(i)} for i in range(2)]
    ctx = StepContext(
        policy=model,
        train_model=model,
        ref=None,
        objective=_ScaledSum(factor),  # type: ignore[arg-type]
        optimizer=opt,
        trainable=list(model.parameters()),
        tokenizer=SimpleNamespace(pad_token_id=0),
        device=torch.device("cpu"),
        stage=StageConfig(steps=1, batch_size=2, max_grad_norm=max_grad_norm),
        world=1,
        autocast=False,
        micro=2,
        with_other=False,
        seed=0,
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
    )
    before = model.w.weight.detach().clone()
    return model, before, (lambda: supervised_step(ctx, rows, 0))


def test_a_finite_step_updates_the_weights():
    model, before, run = _step(1.0, "stop")
    metrics, _ = run()
    assert SKIPPED not in metrics and not torch.equal(model.w.weight, before)


@pytest.mark.parametrize(("factor", "max_grad_norm"), [(math.nan, 1.0), (math.inf, 1.0), (math.inf, 0.0)])
def test_a_non_finite_step_stops_before_the_optimizer(factor, max_grad_norm):
    model, before, run = _step(factor, "stop", max_grad_norm)
    with pytest.raises(NonFiniteStep, match="loss"):
        run()
    assert torch.equal(model.w.weight, before)


def test_skip_step_leaves_the_weights_and_marks_the_record():
    model, before, run = _step(math.nan, "skip_step")
    metrics, _ = run()
    assert metrics[SKIPPED] == 1.0 and torch.equal(model.w.weight, before)
    assert all(p.grad is None for p in model.parameters())


def test_each_rank_reads_a_restart_checkpoint_from_its_own_copy(tmp_path):
    """Ray's shared per-node download directory lets a late rank download again over files an early rank is
    reading (a torn optim.pt in CI). Each rank gets a private copy, removed when it has been read, and the
    reported checkpoint is left as it was."""
    import ray.train

    from revmix.platform.recipe import _own_copy

    reported = tmp_path / "reported"
    reported.mkdir()
    (reported / "optim.pt").write_bytes(b"x" * 1000)
    ckpt = ray.train.Checkpoint.from_directory(str(reported))
    with _own_copy(ckpt, 0) as zero, _own_copy(ckpt, 1) as one:
        assert zero != one and reported not in (zero, one)
        assert (zero / "optim.pt").read_bytes() == (one / "optim.pt").read_bytes() == b"x" * 1000
    assert not zero.exists() and not one.exists()
    assert (reported / "optim.pt").read_bytes() == b"x" * 1000


def test_resume_reads_fields_added_since_the_run_as_their_defaults(tmp_path):
    """A run stored before ``eval.at_start`` existed resumes under a config that leaves it at its default;
    setting it is a change like any other (here one ``--allow-change eval.*`` accepts)."""
    import yaml

    from revmix.config import build_config, to_dict
    from revmix.platform.run_dir import RunDirError, check_resume_config
    from revmix.platform.storage import open_store

    cfg = build_config({"stages": [{"steps": 2}]})
    written = to_dict(cfg)
    del written["eval"]["at_start"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    out = open_store(tmp_path)
    assert check_resume_config(out, cfg) == []
    asked = build_config({"stages": [{"steps": 2}], "eval": {"at_start": True}})
    with pytest.raises(RunDirError, match=r"eval.at_start \(false → true\)"):
        check_resume_config(out, asked)
    assert check_resume_config(out, asked, ["eval.*"]) == ["eval.at_start"]
