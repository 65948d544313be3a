"""Run a sweep on Ray Tune with the Train V2 pattern (docs/ray.md, "Ray Tune").

Each Tune trial is a small driver, :func:`trial_fn`: it builds its ExperimentConfig (base + overrides +
its point + its seed) and calls :func:`revmix.platform.train.run_experiment`, which fits one
``TorchTrainer`` per stage. Step metrics reach Tune as they happen (in-process loop: ``on_report`` →
``tune.report``; Ray workers: ``TuneReportCallback``), then the trial reports its flattened final
metrics with a tiny checkpoint — Tune fills ``Result.metrics`` from checkpoints.

Sweep directory layout (``--out DIR``)::

    DIR/sweep.yaml, spec.json      the sweep file as given, and its validated form (``--resume`` checks it)
    DIR/tune/                      Tune's experiment state; DIR/tune/<trial_id>/ its per-trial logs
    DIR/trials/<trial_id>/         trial.json (point, seed, time), run/ (the experiment), final.json,
                                   error.txt (every failed attempt's traceback), status.json (Tune's verdict)
    DIR/results.parquet, .csv      one row per trial (see results.py), rebuilt from DIR/trials/ alone
    DIR/report.md, report.html     see report.py; results and reports are replaced atomically
    DIR/mlflow.db, DIR/mlruns/     MLflow runs (SQLite) and artifacts, when tracking.mlflow is on
    DIR/wandb/                     W&B run folders (offline-run-*), when tracking.wandb is on

DIR may be a local/NFS path or a bucket URI (``s3://…``, ``gs://…``; :mod:`revmix.platform.storage`):
trials write their folders and runs there, Tune keeps its experiment state there (``storage_path`` +
``storage_filesystem``), and the results and reports are built from the trial folders read back from
there (in a local staging folder) and uploaded. On a multi-node cluster DIR must be a bucket or shared
storage (NFS…), never a node's local disk.

Resume: ``tune.Tuner.restore(DIR/tune, resume_unfinished=True, restart_errored=False)`` keeps finished
trials (and errored ones, unless ``--retry-errored``: ``resume_errored=True``); an unfinished trial's
driver starts again and, finding ``run/config.yaml``, calls ``run_experiment(resume=True)``, which
continues from that run's last checkpoint. The same path handles Tune's retry of a failed trial
(``FailureConfig(max_failures=1)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python

from revmix.platform.console import quiet_libraries
from revmix.platform.data.cache import cache_root
from revmix.platform.storage import Store, as_store, open_store, staging_dir
from revmix.sweeps import results as res
from revmix.sweeps.resources import TrialResources, plan_resources
from revmix.sweeps.space import plain_value
from revmix.sweeps.spec import SweepSpec
from revmix.validation import did_you_mean

TUNE_DIR = "tune"
TRIAL_INDEX = "__trial_index__"  # set by ray.tune.search.Repeater (optuna × seeds)


class SweepExistsError(RuntimeError):
    """``--out`` already holds a sweep and ``--resume`` was not given (or the reverse)."""


# --------------------------------------------------------------------------------------------------
# The trial driver
# --------------------------------------------------------------------------------------------------


def _write_json(store: Store, rel: str, data: Any) -> None:
    store.write(rel, json.dumps(data, indent=1, default=str))


@contextlib.contextmanager
def _local_train_inside_tune():
    """Let an in-process (``num_workers=0``) Train V2 run work inside a Tune trial.

    Ray 2.60 guards ``ray.train.get_context/report/get_checkpoint`` with a DeprecationWarning whenever a
    Tune session exists in the process (it assumes Train workers never share a process with a Tune
    trial). Local mode does exactly that. The guard asks
    ``ray.tune.trainable.trainable_fn_utils._in_tune_session``; we answer False for the duration of the
    run. The trial actor runs nothing else, ``ray.tune.report`` does not consult this function, and the
    original is restored afterwards. Worker runs (``num_workers >= 1``) never need this.
    """
    import ray.tune.trainable.trainable_fn_utils as tfu

    original = tfu._in_tune_session
    tfu._in_tune_session = lambda: False
    try:
        yield
    finally:
        tfu._in_tune_session = original


def trial_seed(spec: SweepSpec, config: dict) -> int:
    """The seed of a trial: a grid value (grid/random search) or the Repeater's index (optuna)."""
    if "seed" in config:
        return int(config["seed"])
    return int(spec.seeds[int(config.get(TRIAL_INDEX, 0))])


class TrialMeta:
    """``trial.json``: the trial's point, seed, attempts, last node and process, and wall time summed over
    attempts.

    A retried or resumed trial keeps counting from the time its earlier attempts recorded.
    """

    def __init__(self, store: Store, tdir: str, trial_id: str, point: dict[str, Any], seed: int) -> None:
        import ray

        self.store, self.path = store, f"{tdir}/{res.TRIAL_META}"
        self.data = (
            json.loads(store.read_text(self.path))
            if store.is_file(self.path)
            else {"elapsed_s": 0.0, "attempts": 0}
        )
        self.prior_s = float(self.data.get("elapsed_s") or 0.0)
        self.started = self.last_save = time.time()
        self.data.update(
            {
                "trial_id": trial_id,
                "point": point,
                "seed": seed,
                "attempts": self.data["attempts"] + 1,
                "node_id": ray.get_runtime_context().get_node_id(),  # which node ran the (last) attempt
                "pid": os.getpid(),  # and which process: one serves several trials (reuse_processes)
            }
        )
        _write_json(self.store, self.path, self.data)

    @property
    def attempt(self) -> int:
        return int(self.data["attempts"])

    @property
    def elapsed_s(self) -> float:
        return float(self.data["elapsed_s"])

    def save(self, force: bool = False) -> None:
        """Record the elapsed time: at most every 5 s while training, always at the end (``force``)."""
        if force or time.time() - self.last_save > 5.0:
            self.data["elapsed_s"] = self.prior_s + time.time() - self.started
            _write_json(self.store, self.path, self.data)
            self.last_save = time.time()


def trial_fn(config: dict, ctx: dict) -> None:
    """One Tune trial: build the config, run (or resume) the experiment, report final metrics."""
    from ray import tune

    quiet_libraries()  # a trial's process: the driver's --verbose reaches it via REVMIX_VERBOSE
    spec: SweepSpec = ctx["spec"]
    store: Store = ctx["store"]  # pickled with its file system: the driver's endpoint and credentials
    trial_id = tune.get_context().get_trial_id()
    tdir = f"trials/{trial_id}"
    point = {p: plain_value(v) for p, v in dict(config["point"]).items()}
    seed = trial_seed(spec, config)
    meta = TrialMeta(store, tdir, trial_id, point, seed)
    store.delete_file(f"{tdir}/{res.STATUS_FILE}")  # a verdict belongs to a trial that has ended
    if store.is_file(f"{tdir}/final.json"):  # finished before the driver died; Tune had not recorded it
        _report_final(spec, json.loads(store.read_text(f"{tdir}/final.json")))
        return
    cfg = _trial_config(spec, point, seed, trial_id, int(ctx["torch_threads"]))
    summary = _run_trial(spec, cfg, store.child(tdir), meta)
    final = res.flatten_summary(summary)
    final[res.FINAL_MARKER] = 1.0
    meta.save(force=True)
    final["wall_s"] = meta.elapsed_s
    _write_json(store, f"{tdir}/final.json", final)
    _report_final(spec, final)


def _trial_config(spec: SweepSpec, point: dict[str, Any], seed: int, trial_id: str, threads: int) -> Any:
    """The trial's ExperimentConfig; torch gets the trial's CPUs as threads unless the config fixes them."""
    import torch

    torch.set_num_threads(threads)
    cfg = spec.trial_config(point, seed, name=f"{spec.name}-{trial_id}")
    if cfg.runtime.torch_threads == 0:
        cfg.runtime.torch_threads = threads
    return cfg


def _run_trial(spec: SweepSpec, cfg: Any, tdir: Store, meta: TrialMeta) -> dict:
    """``run_experiment`` in ``tdir/run`` (resumed when a config is there); every failure lands in error.txt.

    Step metrics reach Tune as they happen: through ``on_report`` in-process, through
    ``TuneReportCallback`` from Ray Train workers.
    """
    from ray import tune

    from revmix.platform.train import run_experiment

    def on_report(record: dict) -> None:
        tune.report({k: float(v) for k, v in record.items() if res.as_float(v) is not None})
        meta.save()

    in_process = cfg.runtime.num_workers == 0
    callbacks = None
    guard: contextlib.AbstractContextManager[None] = _local_train_inside_tune()
    if not in_process:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks, guard = [TuneReportCallback()], contextlib.nullcontext()
    try:
        with guard:
            return run_experiment(
                cfg,
                tdir.child("run"),
                resume=tdir.is_file("run/config.yaml"),
                evaluate=spec.eval,
                on_report=on_report if in_process else None,
                callbacks=callbacks,
            )
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):  # Tune stopping a trial exits with 0
            _record_error(tdir, meta.attempt)
        meta.save(force=True)
        raise


def _report_final(spec: SweepSpec, final: dict) -> None:
    """The trial's last Tune report, with a tiny checkpoint (Tune fills Result.metrics from checkpoints;
    it copies the local folder into its storage, under ``DIR/tune/<trial_id>/``).

    A step metric (``loss``) lives under ``final/`` here; searchers read it by its own name, so it is
    repeated under that name.
    """
    from ray import tune

    ckpt = staging_dir("final-checkpoint")
    try:
        (ckpt / "final.json").write_text(json.dumps(final, indent=1, default=str))
        report = dict(final)
        alias = res.metric_column(spec.metric, list(final))
        if alias != spec.metric and alias in final:
            report[spec.metric] = final[alias]
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(ckpt)))
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


def _record_error(tdir: Store, attempt: int) -> None:
    text = f"--- attempt {attempt} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{traceback.format_exc()}"
    tdir.append_text(res.ERROR_FILE, text)


def trial_dirname(trial: Any) -> str:
    """Tune's per-trial directory is named by the trial id, so ``Result.path`` maps to ``trials/<id>``."""
    return trial.trial_id


# --------------------------------------------------------------------------------------------------
# Building the Tuner
# --------------------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Grid/random: a grid over our own expanded points × seeds. Optuna: Tune domains (seeds: Repeater)."""
    from ray import tune

    from revmix.sweeps.plan import points

    if spec.search.name == "optuna":
        return {"point": {p: d.to_tune() for p, d in spec.space.items()}}
    pts = points(spec)
    return {
        "point": tune.grid_search(pts) if len(pts) > 1 else pts[0],
        "seed": tune.grid_search(list(spec.seeds)) if len(spec.seeds) > 1 else spec.seeds[0],
    }


def _search_alg(spec: SweepSpec):
    if spec.search.name != "optuna":
        return None, 1
    import optuna
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
    # Repeater runs each suggested point once per seed and tells optuna the mean over seeds.
    alg = Repeater(OptunaSearch(sampler=sampler), repeat=len(spec.seeds), set_index=True)
    return alg, spec.search.num_samples * len(spec.seeds)


def _scheduler(spec: SweepSpec):
    if spec.scheduler.name == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = spec.scheduler
    # stop_last_trials=False: the config decides how long a trial trains; ASHA only prunes at its rungs
    # (with True it would also cut every trial at max_t, before the final report with eval metrics).
    return ASHAScheduler(
        time_attr=s.time_attr,
        grace_period=s.grace_period,
        max_t=s.max_t or spec.default_max_t() or 100,
        reduction_factor=s.reduction_factor,
        stop_last_trials=False,
    )


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _comparable(d: dict) -> dict:
    """What a resume must find unchanged: not where the spec came from, nor the trackers (they decide
    where metrics are copied, not what a trial computes; and a sweep stored before ``tracking`` took its
    current shape can still be resumed). A field added to the sweep format after a sweep was stored reads
    as its default there, so a sweep that leaves it unset resumes."""
    added = {
        name: to_jsonable_python(field.get_default(call_default_factory=True))
        for name, field in SweepSpec.model_fields.items()
        if name not in d and not field.is_required()
    }
    return {k: v for k, v in (d | added).items() if k not in ("source", "base", "tracking")}


def _prepare_dir(spec: SweepSpec, out: Path | Store, resume: bool) -> None:
    out_dir = as_store(out)
    out_dir.check_reachable()
    if resume:
        if not out_dir.is_dir(TUNE_DIR):
            raise SweepExistsError(f"--resume: {out_dir} holds no sweep to resume (no {TUNE_DIR}/ inside)")
        stored = json.loads(out_dir.read_text("spec.json")) if out_dir.is_file("spec.json") else None
        if stored is not None and _comparable(stored) != _comparable(spec.to_dict()):
            stored, now = _comparable(stored), _comparable(spec.to_dict())
            diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
            raise SweepExistsError(
                f"--resume: {spec.source} differs from the sweep stored in {out_dir} (keys: "
                f"{', '.join(diff)}); resume with the original file ({out_dir.url('sweep.yaml')}) or use a new "
                "--out"
            )
        return
    if out_dir.listdir():
        raise SweepExistsError(
            f"{out_dir} already exists and is not empty; pass --resume to continue the sweep in it, "
            "or choose a new --out"
        )
    if spec.source.exists():
        out_dir.upload(spec.source, "sweep.yaml")
    _write_json(out_dir, "spec.json", spec.to_dict())


def _check_tracking(spec: SweepSpec, store: Store) -> None:
    """MLflow's default SQLite file needs a local folder: on a bucket, a tracking server must be named."""
    if spec.tracking.mlflow.enabled and spec.tracking.mlflow.tracking_uri is None and not store.is_local:
        raise SweepExistsError(
            f"tracking.mlflow: --out {store} is a bucket, where MLflow's default SQLite store cannot live; "
            "set tracking.mlflow.tracking_uri (an MLflow server) or turn mlflow off. Nothing was written"
        )


@dataclass
class SweepOutcome:
    out_dir: str  # a local path or a bucket URI
    table: Any  # pandas.DataFrame
    report: str | None
    resources: TrialResources


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    resume: bool = False,
    retry_errored: bool = False,
    max_concurrent: int | None = None,
    write_report: bool = True,
    verbose: bool = False,
) -> SweepOutcome:
    """Run (or resume) ``spec`` into ``out_dir``; write the results table and the report.

    ``retry_errored`` (with ``resume``) runs the trials that ended in ERROR again, each resuming its run
    from the last checkpoint (e.g. after fixing what failed them); otherwise they stay as they ended.

    ``verbose`` brings back Ray Tune's per-trial status tables (off: the trials' own progress lines).
    """
    from revmix.platform.runtime import ensure_ray

    store = open_store(out_dir)
    _check_tracking(spec, store)
    _prepare_dir(spec, store, resume)
    ensure_ray()
    plan = _plan_on_cluster(spec, max_concurrent)
    print(f"revmix sweep {spec.name}: {spec.num_trials()} trial(s) → {store}\n  {plan.note}", flush=True)
    prepare_sweep_data(spec)
    grid = _fit(spec, store, plan, resume=resume, retry_errored=retry_errored, verbose=verbose)
    collect_verdicts(spec, store, grid)
    with res.local_record(store) as local:  # the trial folders, read back from a bucket when on one
        table = res.rebuild_table(spec, local)
        res.write_table(table, local)
        print(res.summary_text(table, spec.metric, spec.mode, paths=list(spec.space)), flush=True)
        _warn_if_metric_missing(spec, table)
        written = _report_or_none(local, spec, table) if write_report else None
    report = store.url(written.name) if written else None
    print(f"results: {store.url('results.csv')}" + (f"\nreport: {report}" if report else ""), flush=True)
    return SweepOutcome(store.url(), table, report, plan)


DATA_PATHS = (
    "data.",
    "model.",
    "stages.",
)  # config paths that can change what a trial's data preparation does


def prepare_sweep_data(spec: SweepSpec) -> list[str]:
    """Prepare (tokenise into the content-keyed cache) the data of every distinct data configuration of
    the sweep's trials, once, before any trial starts; returns the cache keys. Trials then find their
    entry and reuse it instead of each tokenising the same rows.

    Grid and random search: every trial's config is known up front. Optuna: only when no sampled path can
    change the data (``data.*``, ``model.*``, ``stages.*``); else each trial prepares its own (the first
    trial with a key builds it, the others wait for it and reuse it).
    """
    from revmix.platform.data.prepare import pairs_needed_by, prepare_experiment_data

    configs = _trial_configs_for_data(spec)
    if configs is None:
        print(
            "revmix sweep: optuna samples a data/model/stages path: each trial prepares its data", flush=True
        )
        return []
    keys: dict[str, str] = {}
    for cfg in configs:
        ident = json.dumps(
            [cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"), pairs_needed_by(cfg)]
        )
        if ident not in keys:
            try:
                keys[ident] = prepare_experiment_data(cfg)[2].key
            except Exception as e:  # e.g. a trial's model that cannot load: that trial fails and is recorded
                keys[ident] = ""
                print(
                    f"revmix sweep: a trial's data was not prepared ahead ({type(e).__name__}); it will try",
                    flush=True,
                )
    print(
        f"revmix sweep: data prepared before the trials: {len(set(keys.values()) - {''})} distinct tokenised "
        f"data key(s) for {len(configs)} trial(s)",
        flush=True,
    )
    return [k for k in dict.fromkeys(keys.values()) if k]


def _trial_configs_for_data(spec: SweepSpec) -> list[Any] | None:
    """Every trial's config (grid / random; optuna with its sampled paths at a representative value, as
    they cannot change the data), or None when optuna samples a path the data depends on."""
    from revmix.sweeps.plan import points

    pts = points(spec)
    if spec.search.name == "optuna":
        sampled = [p for p, d in spec.space.items() if not d.is_grid]
        if any(p.startswith(DATA_PATHS) for p in sampled):
            return None
        fixed = {p: spec.space[p].representative() for p in sampled}
        pts = [{**pt, **fixed} for pt in pts[: max(1, len(pts) // max(1, spec.search.num_samples))]]
    return [spec.trial_config(point, seed) for point in pts for seed in spec.seeds]


def _plan_on_cluster(spec: SweepSpec, max_concurrent: int | None) -> TrialResources:
    """Per-trial resources from the running cluster; one trial never asks for more CPUs than a node has."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=None)
    return plan_resources(spec, ray.cluster_resources(), max_concurrent=max_concurrent, node_cpus=node_cpus)


def _fit(
    spec: SweepSpec, store: Store, plan: TrialResources, *, resume: bool, retry_errored: bool, verbose: bool
) -> Any:
    """Build (or restore) the Tuner and run it to the end; returns Tune's ResultGrid."""
    from ray import tune

    from revmix.platform.tracking import tracking_env, tune_callbacks

    ctx = {"spec": spec, "store": store, "torch_threads": plan.torch_threads}
    out_dir = store.local_path() if store.is_local else _tracking_root(spec, store)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), plan.bundle)
    # Strict metric checking wants the metric in every report; eval/* and final/* metrics only exist in a
    # trial's last one. Auto loggers off: tracking_callbacks adds exactly the ones the sweep asks for.
    env = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    env.update(tracking_env(spec.tracking, out_dir))
    if not verbose:  # Tune's new output engine prints its boxed configuration table even at verbose=0
        env["RAY_AIR_NEW_OUTPUT"] = "0"
    with _env(**env):
        if resume:
            tuner = tune.Tuner.restore(
                store.path(TUNE_DIR),
                trainable=trainable,
                storage_filesystem=store.ray_storage("").get("storage_filesystem"),
                resume_unfinished=True,
                resume_errored=retry_errored,  # from the trial's last Tune checkpoint; its run resumes itself
                restart_errored=False,
            )
        else:
            search_alg, num_samples = _search_alg(spec)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    search_alg=search_alg,
                    scheduler=_scheduler(spec),
                    num_samples=num_samples,
                    max_concurrent_trials=plan.concurrency,
                    # A finished trial's process runs the next one with torch, transformers and revmix
                    # imported (a fresh process costs 4.6 s per trial: benchmarks/sweep_overhead.py). A trial
                    # sets its own threads and seeds, so its numbers do not depend on what ran before in the
                    # process (test_sweep_integration).
                    reuse_actors=spec.reuse_processes,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    **store.ray_storage(""),
                    failure_config=tune.FailureConfig(max_failures=1),
                    callbacks=tune_callbacks(spec.tracking, out_dir, spec.name, verbose),
                    verbose=int(verbose),  # 0: no status tables, 1: Tune's default
                ),
            )
        return tuner.fit()


def _warn_if_metric_missing(spec: SweepSpec, table: Any) -> None:
    """A metric no trial reported is usually a typo: say so, with the reported names closest to it."""
    if res.metric_column(spec.metric, list(table.columns)) not in table.columns and len(table):
        columns = [c for c in table.columns if "/" in c]
        print(
            f"WARNING: no trial reported metric {spec.metric!r}{did_you_mean(spec.metric, columns)}",
            flush=True,
        )


def _tracking_root(spec: SweepSpec, store: Store) -> Path:
    """Where a bucket sweep's local tracker files go (W&B's offline runs; MLflow needs a server there):
    a folder under the cache, one per bucket location, said once so the runs can be synced later."""
    root = cache_root() / "sweep-tracking" / hashlib.sha256(store.url().encode()).hexdigest()[:16]
    if spec.tracking.wandb.enabled and not spec.tracking.wandb.dir:
        print(f"revmix sweep: W&B writes its offline runs locally, in {root}/wandb (wandb sync)", flush=True)
    return root


def _report_or_none(out_dir: Path, spec: SweepSpec, table: Any) -> Path | None:
    """The report, or None with a line saying why: the table is written; a plotting failure must not hide it."""
    from revmix.sweeps.report import write_report

    try:
        return write_report(out_dir, spec=spec, table=table)
    except Exception as e:
        print(f"revmix sweep: report failed: {type(e).__name__}: {e}", flush=True)
        return None


def collect_results(spec: SweepSpec, out_dir: Path | Store, grid: Any) -> Any:
    """One row per Tune trial: the verdicts saved (:func:`collect_verdicts`), then the table rebuilt from
    the trial folders."""
    store = as_store(out_dir)
    collect_verdicts(spec, store, grid)
    with res.local_record(store) as local:
        return res.rebuild_table(spec, local)


def collect_verdicts(spec: SweepSpec, store: Store, grid: Any) -> None:
    """Tune's verdict of every trial saved in its folder, from which the results table is then built.

    The folders are thereby the whole record of the sweep: ``revmix report DIR`` rebuilds the same table
    from them when ``results.*`` are lost.
    """
    for r in grid:
        _save_verdict(spec, store.child(f"trials/{Path(r.path).name}"), r)


def _save_verdict(spec: SweepSpec, tdir: Store, result: Any) -> None:
    """Tune's status of one trial into ``tdir``, with a ``trial.json`` and an error file where it has none.

    TERMINATED needs a final result; a trial Tune ended without one was stopped early by the scheduler.
    A trial that failed before its driver ran (nothing in ``tdir``) gets its point from Tune's config and
    its error from Tune.
    """
    if not tdir.is_file(res.TRIAL_META):
        config = result.config or {}
        point = {p: plain_value(v) for p, v in dict(config.get("point") or {}).items()}
        seed = trial_seed(spec, config) if config else spec.seeds[0]
        trial_id = Path(result.path).name
        meta = {"trial_id": trial_id, "point": point, "seed": seed, "attempts": 0, "elapsed_s": None}
        _write_json(tdir, res.TRIAL_META, meta)
    if result.error is not None:
        status = res.STATUS_ERROR
        if not tdir.is_file(res.ERROR_FILE):
            tdir.write(
                res.ERROR_FILE, "".join(traceback.format_exception_only(type(result.error), result.error))
            )
    else:
        status = res.STATUS_OK if tdir.is_file("final.json") else res.STATUS_STOPPED
    _write_json(tdir, res.STATUS_FILE, {"status": status})
