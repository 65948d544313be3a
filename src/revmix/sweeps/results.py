"""The results table of a sweep: one row per trial.

A row holds the trial id and status, the value of every swept path plus the seed, a few descriptors
derived from the trial's full config (model, objective chain, reverse fraction, schedule — so the report
can group trials even when those were not swept; ``objective_config`` adds each stage's non-default
objective hyper-parameters, ``sft→dpo(ipo)``), the final metrics flattened to flat names, wall time
and the error of a failed trial. It lands as ``DIR/results.parquet`` (typed, for pandas) and
``DIR/results.csv`` (for eyes and spreadsheets), both written atomically. Every cell comes from the trial
folders, so the two files can always be rebuilt from them (:func:`rebuild_table`; ``revmix report DIR``).

Flat metric names (also what a trial reports to Tune at its end, so ``metric:`` can name any of them)::

    eval/accuracy/<bench>               eval/accuracy/<bench>/<forward|reverse>   (mean over samples)
    eval/pass@<k>/<bench>[/<dir>]       eval/maj@<k>/<bench>[/<dir>]   (eval.samples > 1; docs/evaluation.md)
    eval/alp/<forward|reverse>/<chosen|rejected|margin>
    final/<key>                         last step's metrics of the last stage (final/loss, final/nll/forward…)
    stage<i>/<key>, stage<i>/eval/...   the same for earlier stages of a multi-stage experiment
    start/eval/...                      the starting model's evaluation (eval.at_start), before any stage
    train/steps, train/wall_s           the whole run; train/tokens_per_s (mean over stages)
    train/stage<i>/tokens_per_s         each stage's throughput
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from revmix.atomic import atomic_target
from revmix.platform.storage import Store, staging_dir
from revmix.sweeps.plan import format_value
from revmix.sweeps.spec import ALP_PARTS, SweepSpec

# Step-record bookkeeping keys that are not metrics.
_BOOKKEEPING = ("stage", "step", "epoch", "stage_name")
STATUS_OK = "TERMINATED"
STATUS_ERROR = "ERROR"
STATUS_STOPPED = "STOPPED"  # stopped early by the scheduler (ASHA)
STATUS_INCOMPLETE = "INCOMPLETE"  # the sweep ended (or was killed) before this trial finished
# A trial folder DIR/trials/<id>/ holds: trial.json (point, seed, attempts, node, wall time), final.json
# (final metrics), error.txt (each failed attempt's traceback), status.json (Tune's verdict, at the end).
TRIAL_META, ERROR_FILE, STATUS_FILE = "trial.json", "error.txt", "status.json"
FINAL_MARKER = "final/done"
DESCRIPTORS = ("model", "objective", "mix", "reverse_fraction", "schedule")
# Each stage's objective with its non-default hyper-parameters, "sft→dpo(ipo)": the objectives view's
# rows. Not a descriptor: it restates ``objective`` whenever only names differ.
OBJECTIVE_CONFIG = "objective_config"


MISSING = "—"  # a table cell with no value: a metric the trial never reported, NaN


def format_cell(v: Any) -> str:
    """One cell of a results table as text (terminal summary and report alike): floats to 4 digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def flatten_eval(ev: dict | None, prefix: str = "eval") -> dict[str, float]:
    """``summary["eval"]`` → ``{eval/<accuracy|pass@k|maj@k>/<bench>[/<dir>], eval/n/<bench>,
    eval/alp/<dir>/<part>}``."""
    found: dict[str, Any] = {}
    for bench, b in ((ev or {}).get("benchmarks") or {}).items():
        if isinstance(b, dict):
            found[f"{prefix}/n/{bench}"] = b.get("n")
            found.update(_sample_metrics(b, prefix, bench))
            for d, bd in (b.get("by_direction") or {}).items():
                found.update(_sample_metrics(bd if isinstance(bd, dict) else {}, prefix, f"{bench}/{d}"))
    for d, a in ((ev or {}).get("alp") or {}).items():
        for part in ALP_PARTS:
            found[f"{prefix}/alp/{d}/{part}"] = a.get(part) if isinstance(a, dict) else None
    return {key: float(v) for key, v in found.items() if as_float(v) is not None}


def _sample_metrics(entry: dict, prefix: str, where: str) -> dict[str, Any]:
    """``accuracy`` (mean over samples), ``pass@k`` and ``maj@k`` of one benchmark entry as flat names."""
    names = ["accuracy", *sorted(k for k in entry if k.startswith(("pass@", "maj@")))]
    return {f"{prefix}/{name}/{where}": entry.get(name) for name in names}


def flatten_metrics(record: dict, prefix: str) -> dict[str, float]:
    """Numeric entries of one step record under ``prefix/`` (bookkeeping keys dropped)."""
    return {
        f"{prefix}/{k}": float(v)
        for k, v in record.items()
        if k not in _BOOKKEEPING and as_float(v) is not None and math.isfinite(float(v))
    }


def evaluations(columns: list[str]) -> list[tuple[str, str]]:
    """(column prefix, words) of each evaluation whose accuracy some column holds, the end of the run first,
    then each earlier stage from the last (``stage<i>/``), then the starting model (``start/``)."""
    stages = {int(m.group(1)) for c in columns if (m := re.match(r"stage(\d+)/eval/accuracy/", c))}
    found = [("", "end of run")] if any(c.startswith("eval/accuracy/") for c in columns) else []
    found += [(f"stage{i}/", f"after stage {i}") for i in sorted(stages, reverse=True)]
    return found + (
        [("start/", "starting model")] if any(c.startswith("start/eval/accuracy/") for c in columns) else []
    )


def flatten_summary(summary: dict) -> dict[str, float]:
    """A ``run_experiment`` summary → flat final metrics (see the module docstring for the names)."""
    stages = summary.get("stages") or []
    out: dict[str, float] = {}
    last = stages[-1] if stages else {}
    out.update(flatten_metrics(summary.get("final") or last.get("final") or {}, "final"))
    out.update(flatten_eval(summary.get("eval", last.get("eval"))))
    out.update(flatten_eval(summary.get("start_eval"), "start/eval"))
    for i, st in enumerate(stages[:-1]):
        out.update(flatten_metrics(st.get("final") or {}, f"stage{i}"))
        out.update(flatten_eval(st.get("eval"), f"stage{i}/eval"))
    for key in ("steps", "wall_s"):
        if as_float(summary.get(key)) is not None:
            out[f"train/{key}"] = float(summary[key])
    for i, st in enumerate(stages):  # per stage: objectives differ in cost within one stage
        if as_float(st.get("tokens_per_s")) is not None:
            out[f"train/stage{i}/tokens_per_s"] = float(st["tokens_per_s"])
    if stages and all(as_float(s.get("tokens_per_s")) is not None for s in stages):
        out["train/tokens_per_s"] = sum(float(s["tokens_per_s"]) for s in stages) / len(stages)
    return out


def metric_column(metric: str, columns: list[str]) -> str:
    """The table column of a sweep metric: itself, or ``final/<metric>`` for a step metric like ``loss``."""
    if metric in columns or metric.startswith(("eval/", "final/", "stage")):
        return metric
    return f"final/{metric}" if f"final/{metric}" in columns else metric


def last_step_metrics(path: Path) -> dict[str, float] | None:
    """``final/*`` metrics from the last record of a run's metrics.jsonl (a trial stopped early)."""
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return flatten_metrics(last, "final") if last else None


def objective_label(objective: Any) -> str:
    """An objective and its hyper-parameters that differ from their defaults: ``dpo``, ``dpo(ipo)``,
    ``dpo(robust, label_smoothing=0.1)``, ``dpo(rpo_alpha=1)`` (a ``loss_type`` shows as its value)."""
    parts, dumped = [], objective.model_dump(mode="json")
    for key, field in type(objective).model_fields.items():
        value = getattr(objective, key)
        if key == "name" or (
            not field.is_required() and value == field.get_default(call_default_factory=True)
        ):
            continue
        parts.append(str(dumped[key]) if key == "loss_type" else f"{key}={format_value(dumped[key])}")
    return f"{objective.name}({', '.join(parts)})" if parts else str(objective.name)


def describe_config(cfg: Any, spec: SweepSpec | None = None) -> dict[str, Any]:
    """Grouping descriptors of one trial's ExperimentConfig, for the report's lines and axes.

    ``reverse_fraction`` is the swept ``*.mix.reverse_fraction`` (or ``*.mix``) when one is swept, else
    stage 0's. A ``union`` mix (the paper's D_m: all rows of both directions) has r = 0.5 — twin rows
    come in pairs — and ``mix = "union"`` so the report shows it apart from fixed-budget r = 0.5.
    """
    stages = cfg.stages
    idx = 0
    if spec is not None:
        swept = [p for p in spec.space if p.endswith("mix.reverse_fraction") or p.endswith(".mix")]
        if swept and swept[0].startswith("stages."):
            idx = int(swept[0].split(".")[1])
    mix = stages[idx].mix
    r = 0.5 if mix.mode == "union" else mix.reverse_fraction
    model = cfg.model.name_or_path
    model = Path(model).name if model else f"tiny-{cfg.model.scale}"
    schedules = [st.mix.schedule.kind for st in stages]
    return {
        "model": model,
        "objective": "→".join(st.objective.name for st in stages),
        "mix": mix.mode,
        "reverse_fraction": float(r),
        "schedule": "→".join(schedules) if len(set(schedules)) > 1 else schedules[0],
        OBJECTIVE_CONFIG: "→".join(objective_label(st.objective) for st in stages),
    }


def make_row(
    spec: SweepSpec,
    trial_id: str,
    point: dict[str, Any],
    seed: int,
    *,
    final: dict[str, float] | None,
    status: str,
    error: str | None,
    wall_s: float | None,
    run_dir: str | None,
    node_id: str | None = None,
) -> dict[str, Any]:
    """One results row; non-scalar swept values (objective dicts, lists) are stored in short text form."""
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}
    for p in spec.space:
        v = point.get(p)
        row[p] = v if v is None or isinstance(v, (bool, int, float, str)) else format_value(v)
    row["seed"] = int(seed)
    try:
        row.update(describe_config(spec.trial_config(point, seed), spec))
    except Exception:  # a point the config rejects still gets its row (the error column says why)
        row.update({k: None for k in (*DESCRIPTORS, OBJECTIVE_CONFIG)})
    row.update({k: v for k, v in (final or {}).items() if k != FINAL_MARKER})
    row.update(wall_s=wall_s, error=error, run_dir=run_dir, node_id=node_id)
    return row


def short_error(text: str | None, limit: int = 300) -> str | None:
    """The last ``SomethingError: message`` line of a traceback (Tune wraps errors in several layers)."""
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    pick = next(
        (
            ln
            for ln in reversed(lines)
            if ":" in ln and ln.split(":", 1)[0].rstrip().endswith(("Error", "Exception"))
        ),
        lines[-1] if lines else str(text),
    )
    return pick if len(pick) <= limit else pick[: limit - 1] + "…"


def column_order(columns: list[str], spec_paths: list[str]) -> list[str]:
    head = ["trial_id", "status", *spec_paths, "seed", *DESCRIPTORS, OBJECTIVE_CONFIG]
    evals = sorted(c for c in columns if c.startswith("eval/"))
    finals = sorted(c for c in columns if c.startswith("final/"))
    stages = sorted(c for c in columns if c.startswith("stage") and "/" in c)
    train = sorted(c for c in columns if c.startswith("train/"))
    tail = ["wall_s", "error", "run_dir", "node_id"]
    known = set(head + evals + finals + stages + train + tail)
    rest = sorted(c for c in columns if c not in known)
    return [c for c in head + evals + finals + stages + train + rest + tail if c in columns]


def build_table(rows: list[dict[str, Any]], spec_paths: list[str]):
    """Rows → a pandas DataFrame with a stable column order (ids, config, descriptors, metrics, tail)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["trial_id", "status", *spec_paths, "seed", "wall_s", "error"])
    df = df[column_order(list(df.columns), spec_paths)]
    return df.sort_values("trial_id", kind="stable").reset_index(drop=True)


def write_table(df, out_dir: str | Path) -> tuple[Path, Path]:
    """``results.parquet`` + ``results.csv`` in ``out_dir``, each written atomically (a reader sees the old
    file or the new one, never half of one); object columns with mixed types become text."""
    out_dir = Path(out_dir)
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                df[c] = df[c].map(lambda v: None if v is None else str(v))
    pq, csv = out_dir / "results.parquet", out_dir / "results.csv"
    with atomic_target(pq) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_target(csv) as tmp:
        df.to_csv(tmp, index=False)
    return pq, csv


def read_table(out_dir: str | Path):
    import pandas as pd

    out_dir = Path(out_dir)
    if (out_dir / "results.parquet").exists():
        return pd.read_parquet(out_dir / "results.parquet")
    if (out_dir / "results.csv").exists():
        return pd.read_csv(out_dir / "results.csv")
    raise FileNotFoundError(f"{out_dir}: no results.parquet or results.csv (is this a sweep directory?)")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def trial_row(spec: SweepSpec, out_dir: Path, tdir: Path) -> dict[str, Any]:
    """The results row of one trial folder (``trials/<id>/``): everything a row needs is kept there.

    Status: the one Tune gave (``status.json``, written when the sweep ends); for a sweep killed before
    that, inferred: a final result → TERMINATED, an error file → ERROR, otherwise INCOMPLETE. A trial the
    scheduler stopped early has no final result: its last logged step stands in for it.
    """
    meta = json.loads((tdir / TRIAL_META).read_text())
    final = _read_json(tdir / "final.json")
    err_path = tdir / ERROR_FILE
    err = err_path.read_text() if err_path.exists() else None
    verdict = _read_json(tdir / STATUS_FILE) or {}
    status = verdict.get("status") or (STATUS_OK if final else (STATUS_ERROR if err else STATUS_INCOMPLETE))
    if status == STATUS_STOPPED and final is None:
        final = last_step_metrics(tdir / "run" / "metrics.jsonl")
    return make_row(
        spec,
        meta["trial_id"],
        meta["point"],
        meta["seed"],
        final=final,
        status=status,
        error=short_error(err) if status == STATUS_ERROR else None,
        wall_s=meta.get("elapsed_s"),
        run_dir=str(tdir.relative_to(out_dir) / "run"),
        node_id=meta.get("node_id"),
    )


def rows_from_trial_dirs(spec: SweepSpec, out_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial's row, rebuilt from ``DIR/trials/<id>/`` alone (see :func:`trial_row`)."""
    out_dir = Path(out_dir)
    return [
        trial_row(spec, out_dir, meta.parent) for meta in sorted((out_dir / "trials").glob(f"*/{TRIAL_META}"))
    ]


def rebuild_table(spec: SweepSpec, out_dir: str | Path):
    """The results table from the trial folders: what ``revmix sweep`` wrote, after any loss of results.*."""
    return build_table(rows_from_trial_dirs(spec, out_dir), list(spec.space))


def has_trial_folders(out_dir: str | Path) -> bool:
    return any((Path(out_dir) / "trials").glob(f"*/{TRIAL_META}"))


def load_table(spec: SweepSpec, out_dir: str | Path):
    """A sweep directory's table: rebuilt from its trial folders (the record), or read from ``results.*``
    when there are none (a directory holding only the table)."""
    return rebuild_table(spec, out_dir) if has_trial_folders(out_dir) else read_table(out_dir)


def failed_trials(df, out_dir: str | Path) -> list[tuple[str, str]]:
    """``(trial id, its error file)`` for every trial that ended in ERROR, in table order (``out_dir``: a
    local path or a bucket URI)."""
    if "status" not in df.columns:
        return []
    ids = [str(t) for t in df.loc[df["status"] == STATUS_ERROR, "trial_id"]]
    return [(t, f"{str(out_dir).rstrip('/')}/trials/{t}/{ERROR_FILE}") for t in ids]


# What the table and the report read from a sweep directory (no models, checkpoints or Tune state).
RECORD_FILES = (TRIAL_META, "final.json", ERROR_FILE, STATUS_FILE, "run/metrics.jsonl", "run/summary.json")
SWEEP_FILES = ("spec.json", "sweep.yaml", "results.parquet", "results.csv")
OUTPUTS = ("results.parquet", "results.csv", "report.md", "report.html", "plots")


@contextlib.contextmanager
def local_record(store: Store) -> Iterator[Path]:
    """The sweep directory's record as a local folder for the table and report code: the folder itself
    when local; from a bucket, the trial folders' record files downloaded into a staging folder, and
    what was written there (results, reports, plots) uploaded back when the block ends without error."""
    if store.is_local:
        yield store.local_path()
        return
    work = staging_dir("sweep-record")
    try:
        for rel in store.walk("trials"):
            parts = rel.split("/", 1)
            if len(parts) == 2 and parts[1] in RECORD_FILES:
                store.download(f"trials/{rel}", work / "trials" / rel)
        for name in SWEEP_FILES:
            if store.is_file(name):
                store.download(name, work / name)
        yield work
        for name in OUTPUTS:
            if (work / name).exists():
                store.upload(work / name, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary_text(df, metric: str, mode: str, max_rows: int = 20, paths: list[str] | None = None) -> str:
    """A compact terminal table, best first: id, status, swept values, seed, metric, key metrics, time."""
    if df.empty:
        return "(no trials)"
    paths = [p for p in (paths or []) if p in df.columns]
    extra = [c for c in df.columns if c.startswith("eval/accuracy/") and c.count("/") == 2][:2]
    extra += [
        c for c in ("eval/alp/forward/margin", "eval/alp/reverse/margin", "final/loss") if c in df.columns
    ]
    metric = metric_column(metric, list(df.columns))
    cols = ["trial_id", "status", *paths, "seed"]
    if metric in df.columns:
        cols.append(metric)
    cols += [c for c in extra if c != metric] + ["wall_s"]
    view = best_rows(df, metric, mode)
    view = view[[c for c in cols if c in view.columns]].head(max_rows)

    def short(c: str) -> str:
        for long, brief in (("stages.", "s."), ("eval/accuracy/", "acc/"), ("eval/alp/", "alp/")):
            c = c.replace(long, brief)
        return c.replace("eval/pass@", "pass@").replace("eval/maj@", "maj@")

    header = [short(c) for c in view.columns]
    body = [[format_cell(v) for v in r] for r in view.itertuples(index=False)]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    if len(df) > max_rows:
        lines.append(f"… {len(df) - max_rows} more trial(s) in results.csv")
    errors = df[df["status"] == STATUS_ERROR] if "status" in df.columns else df.iloc[0:0]
    for r in errors.itertuples(index=False):
        lines.append(f"ERROR {r.trial_id}: {r.error}")
    return "\n".join(lines)


def best_rows(df, metric: str, mode: str):
    """Trials sorted best first on ``metric`` (NaNs last)."""
    metric = metric_column(metric, list(df.columns))
    if metric not in df.columns:
        return df
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
