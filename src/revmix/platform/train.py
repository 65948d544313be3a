"""Training on Ray Train V2: the per-worker loop, stage chaining, checkpoints (DESIGN §4, §6).

Read top to bottom: :func:`run_experiment` prepares data once, then fits one ``TorchTrainer`` per stage;
each worker runs :func:`train_loop_per_worker`: Mixer → batch → objective → backward → AdamW, reporting
metrics every step and a checkpoint (trainable weights, optimizer, scheduler, mixer state) from rank 0.
A stage ends by merging its LoRA adapter into a full model saved under ``stages/<i>/model``, which the
next stage loads and trains a fresh adapter on — its reference policy is that model with the adapter
disabled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revmix.config import ExperimentConfig, StageConfig, build_config, to_dict
from revmix.objectives.base import build_objective
from revmix.platform.data.mixer import Mixer, schedule_from_config
from revmix.platform.data.schema import DIRECTIONS
from revmix.platform.data.streams import DirectionStream, rows_from_shard
from revmix.platform.data.tokenize import collate

CKPT_STATE = "state.json"


# --------------------------------------------------------------------------------------------------
# Stage planning
# --------------------------------------------------------------------------------------------------


def stage_plan(stage: StageConfig, n_items: int, n_forward: int, n_reverse: int) -> dict[str, Any]:
    """Steps and the mix of one stage (see the Mixer docstring for what ``reverse_fraction`` means)."""
    if stage.mix.mode == "union":
        per_epoch = n_forward + n_reverse
        schedule = schedule_from_config(stage.mix)
        r = n_reverse / per_epoch if per_epoch else 0.0
        schedule = type(schedule)(kind="constant", start=r, end=r)
    else:
        per_epoch = stage.mix.total or n_items
        schedule = schedule_from_config(stage.mix)
    steps = (
        stage.steps
        if stage.steps is not None
        else max(1, math.ceil(stage.epochs * per_epoch / stage.batch_size))
    )
    steps_per_epoch = max(1, round(per_epoch / stage.batch_size))
    return {"steps": steps, "steps_per_epoch": steps_per_epoch, "schedule": schedule}


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


# --------------------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------------------


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch as rtt

        try:
            return rtt.get_device()
        except Exception:
            return torch.device("cuda")
    return torch.device("cpu")


def _build_policy(cfg: ExperimentConfig, init_path: str, device: torch.device, lora: bool):
    from revmix.platform.models import LoraSpec, apply_lora, load_model, load_tokenizer

    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = load_model(init_path, dtype=dtype, device=device)
    if lora:
        lo = cfg.model.lora
        model = apply_lora(model, LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules)))
    return model, load_tokenizer(init_path)


def _make_reference(kind: str, policy: torch.nn.Module, lora: bool, buckets: int = 1):
    """The stage's reference policy: the stage-start model, as the adapter-disabled view or a copy."""
    from revmix.objectives.reference import AdapterDisabledReference, FrozenCopyReference

    if kind == "auto":
        kind = "adapter" if lora else "copy"
    if kind == "cache":  # the cache is filled from the cheapest live reference, then used instead
        kind = "adapter" if lora else "copy"
    if kind == "adapter":
        if not lora:
            raise ValueError(
                "stages.*.reference: 'adapter' needs model.lora.enabled=true; use 'copy' or 'cache'"
            )
        return AdapterDisabledReference(policy, buckets)
    return FrozenCopyReference(policy, buckets)


def _reference_cache(ref, rows: dict[str, list[dict]], tokenizer, init_path: str, device: torch.device):
    """Reference log-probs of every training row, computed once per (model, tokenizer, data) and cached."""
    from revmix.objectives.reference import ReferenceLogpCache, cache_key
    from revmix.platform.data.prepare import cache_root

    weights = sorted(Path(init_path).glob("*.safetensors"))
    model_id = "|".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights) or init_path
    all_rows = [r for d in DIRECTIONS for r in rows[d]]
    key = cache_key(
        model_id, str(init_path) + str(len(tokenizer)), [(r["item_id"], r["direction"]) for r in all_rows]
    )
    cache = ReferenceLogpCache(cache_root() / "ref_logps", key)
    if not cache.load():
        for i in range(0, len(all_rows), 32):
            cache.fill(ref, collate(all_rows[i : i + 32], tokenizer.pad_token_id).to(device))
        cache.save()
    return cache


def _save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    from revmix.platform.models import trainable_state_dict

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(model).items()},
        str(tmp / "trainable.safetensors"),
    )
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / CKPT_STATE).write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    from revmix.platform.models import load_trainable_state_dict

    try:
        load_trainable_state_dict(model, load_file(str(path / "trainable.safetensors")))
    except KeyError as e:
        raise ValueError(f"checkpoint {path} does not fit this model: {e}") from None
    opt = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / CKPT_STATE).read_text())


def _allreduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


@dataclass
class StepContext:
    """Everything one optimisation step needs; the PPO step (``platform/rollout/step.py``) takes the same."""

    policy: torch.nn.Module  # the (PEFT) model itself
    train_model: torch.nn.Module  # what forward passes go through (DDP-wrapped with several workers)
    ref: Any
    objective: Any
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    tokenizer: Any
    device: torch.device
    stage: StageConfig
    world: int
    autocast: bool
    micro: int
    with_other: bool
    seed: int
    ref_cache: Any = None  # ReferenceLogpCache when stages.*.reference is "cache"


def supervised_step(ctx: StepContext, batch_rows: list[dict], step: int) -> tuple[dict[str, float], int]:
    """Gradient accumulation over micro-batches, clipping and one AdamW step; returns (metrics, tokens)."""
    stage = ctx.stage
    ctx.train_model.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    n_tokens = 0
    grads_applied = False
    pad_id = ctx.tokenizer.pad_token_id
    for k in range(stage.grad_accum):
        rows = batch_rows[k * ctx.micro : (k + 1) * ctx.micro]
        mb = collate(rows, pad_id, with_other=ctx.with_other).to(ctx.device)
        if ctx.ref_cache is not None and not ctx.ref_cache.attach(mb):
            raise RuntimeError("reference cache miss: a training row has no cached reference log-probs")
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
            out = ctx.objective(ctx.train_model, mb, ctx.ref)
        if not out.grads_applied:
            (out.loss / stage.grad_accum).backward()
        grads_applied = grads_applied or out.grads_applied
        n_tokens += int(mb.attention_mask.sum())
        if ctx.with_other and mb.other_attention_mask is not None:
            n_tokens += int(mb.other_attention_mask.sum())
        for key, v in out.metrics.items():
            sums[key] = sums.get(key, 0.0) + v
            counts[key] = counts.get(key, 0) + 1
    if grads_applied:  # the objective wrote .grad itself (PCGrad): average micro-batches and workers
        if stage.grad_accum > 1:
            for p in ctx.trainable:
                if p.grad is not None:
                    p.grad /= stage.grad_accum
        if ctx.world > 1:
            _allreduce_grads(ctx.trainable)
    grad_norm = 0.0
    if stage.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ctx.trainable, stage.max_grad_norm))
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    metrics = {k: sums[k] / counts[k] for k in sums}
    metrics["grad_norm"] = grad_norm
    return metrics, n_tokens


def train_loop_per_worker(config: dict) -> dict:
    """One stage on one worker. ``config`` is plain data (see :func:`_loop_config`)."""
    import ray.train

    cfg = build_config(config["experiment"])
    stage_idx: int = config["stage"]
    stage = cfg.stages[stage_idx]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    use_gpu = bool(config["use_gpu"])
    device = _device(use_gpu)
    torch.manual_seed(cfg.seed + 1000 * stage_idx + rank)

    lora = cfg.model.lora.enabled if stage.lora is None else stage.lora
    policy, tokenizer = _build_policy(cfg, config["init_path"], device, lora)
    objective = build_objective(stage.objective, path=f"stages.{stage_idx}.objective")
    buckets = cfg.runtime.length_buckets
    ref = _make_reference(stage.reference, policy, lora, buckets) if objective.needs_reference else None
    if hasattr(objective, "prepare_policy"):  # e.g. PPO's value head: before DDP and the optimizer see params
        objective.prepare_policy(policy)
    train_model: torch.nn.Module = policy
    if buckets > 1 and not objective.needs_rollouts:  # PPO's passes need the model itself (value head)
        from revmix.objectives.buckets import LengthBucketedLM

        train_model = LengthBucketedLM(policy, buckets)
    if world > 1:  # DDP wraps the bucketed model: still one forward per backward
        import ray.train.torch as rtt

        train_model = rtt.prepare_model(train_model, move_to_device=False)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    steps: int = config["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(stage.warmup_steps, steps, stage.min_lr_ratio)
    )
    per_worker_batch = stage.batch_size // world
    mixer = Mixer(
        per_worker_batch, steps, schedule_from_config_dict(config["schedule"]), seed=cfg.seed * 7919 + rank
    )

    # Data: in-process lists (num_workers=0) or this worker's Ray Data shards.
    if config.get("inline_data") is not None:
        rows = config["inline_data"]
    else:
        rows = {d: rows_from_shard(ray.train.get_dataset_shard(d)) for d in DIRECTIONS}
    stream_seed = cfg.seed * 104729 + rank
    streams = {d: DirectionStream(rows[d], stream_seed, d) if rows[d] else None for d in DIRECTIONS}

    ref_cache = None
    if ref is not None and stage.reference == "cache":
        ref_cache = _reference_cache(ref, rows, tokenizer, config["init_path"], device)

    # Resume: a FailureConfig restart hands us Ray's checkpoint; `revmix train --resume` names ours.
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    resume_dir = None
    if ckpt is not None:
        resume_dir = Path(ckpt.to_directory())
    elif config.get("resume_from"):
        resume_dir = Path(config["resume_from"])
    if resume_dir is not None:
        state = _load_checkpoint(resume_dir, policy, optimizer, scheduler)
        start_step = mixer.check_state(state["mixer"])
    consumed = mixer.consumed(start_step)
    for d, n in zip(DIRECTIONS, consumed):
        if streams[d] is not None:
            streams[d].skip(n)

    out_dir = Path(config["out_dir"])
    ckpt_root = out_dir / "checkpoints" / f"stage{stage_idx}"
    metrics_path = out_dir / "metrics.jsonl"
    precision = cfg.runtime.precision
    autocast = (precision == "bf16") or (precision == "auto" and device.type == "cuda")
    micro = per_worker_batch // stage.grad_accum
    with_other = "other_response" in objective.requires
    stop_after = config.get("stop_after_steps")  # testing hook: simulate a crash after N steps

    sctx = StepContext(
        policy=policy,
        train_model=train_model,
        ref=ref,
        objective=objective,
        optimizer=optimizer,
        trainable=trainable,
        tokenizer=tokenizer,
        device=device,
        stage=stage,
        world=world,
        autocast=autocast,
        micro=micro,
        with_other=with_other,
        seed=cfg.seed * 31 + rank,
        ref_cache=ref_cache,
    )
    step_fn: Any = supervised_step
    engine = None
    if objective.needs_rollouts:  # one rollout engine per stage; it receives the live weights every step
        from revmix.platform.rollout.engines import build_rollout_engine
        from revmix.platform.rollout.step import ppo_step

        engine = build_rollout_engine(objective, policy, tokenizer, config["init_path"], seed=cfg.seed + rank)
        step_fn = functools.partial(ppo_step, engine=engine)
    last: dict[str, float] = {}
    t_stage = time.perf_counter()
    tokens_total = 0
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            dirs = mixer.directions(step)
            batch_rows = [next(streams[DIRECTIONS[d]]) for d in dirs]
            m, n_tokens = step_fn(sctx, batch_rows, step)
            scheduler.step()
            dt = time.perf_counter() - t0
            tokens_total += n_tokens
            n_rev = sum(dirs)
            m.update(
                {
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                    "mix/reverse_fraction": n_rev / len(dirs),
                    "mix/n_reverse": float(n_rev),
                    "mix/n_forward": float(len(dirs) - n_rev),
                }
            )
            if stage.grad_cosine_every and (step + 1) % stage.grad_cosine_every == 0:
                from revmix.objectives.surgery import direction_gradient_cosine

                full = collate(batch_rows, tokenizer.pad_token_id, with_other=with_other).to(device)
                cos = direction_gradient_cosine(policy, objective, full, ref)
                if cos is not None:
                    m["grad_cosine/forward_reverse"] = cos
            m = _allreduce_mean(m)
            epoch = (step + 1) / config["steps_per_epoch"]
            record = {
                "stage": stage_idx,
                "stage_name": stage.name,
                "step": step + 1,
                "epoch": round(epoch, 4),
                **m,
            }
            done = step + 1 == steps
            epoch_end = (step + 1) % config["steps_per_epoch"] == 0
            if (
                rank == 0
                and config.get("eval_rows")
                and (
                    (cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0)
                    or (cfg.eval.every_epoch and epoch_end)
                )
            ):
                record.update(_call_eval(config, policy, tokenizer, alp_only=True))
            want_ckpt = done or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if (step + 1) % max(stage.log_every, 1) == 0 or done:
                    _progress(stage, stage_idx, step + 1, steps, m)
            checkpoint = None
            if want_ckpt:
                path = ckpt_root / f"step_{step + 1:06d}"
                if rank == 0:
                    state = {"stage": stage_idx, "mixer": mixer.state(step + 1), "tokens": tokens_total}
                    _save_checkpoint(path, policy, optimizer, scheduler, state)
                    checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(record, checkpoint=checkpoint)
            if rank == 0 and config.get("on_report") is not None:  # in-process only (num_workers=0)
                config["on_report"](record)
            last = {**last, **record}  # keeps the latest value of per-direction keys absent from this step
            if stop_after is not None and step + 1 - start_step >= stop_after:
                raise SystemExit(f"stop_after_steps={stop_after}: simulated interruption")
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()  # frees a vLLM engine's memory before the stage's eval and save

    wall = time.perf_counter() - t_stage
    result = {"final": last, "wall_s": wall, "tokens": tokens_total, "steps": steps, "start_step": start_step}
    if rank == 0:
        from revmix.platform.models import merge_lora, save_model

        if config.get("eval_rows") and cfg.eval.at_stage_end:
            result["eval"] = _call_eval(config, policy, tokenizer, alp_only=False)
        if hasattr(objective, "release_policy"):  # keep heads that only training needs out of the model
            objective.release_policy(policy)
        stage_dir = out_dir / "stages" / str(stage_idx)
        merged = merge_lora(policy) if lora else policy
        save_model(merged, tokenizer, stage_dir / "model")
        (stage_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def schedule_from_config_dict(d: dict):
    from revmix.platform.data.mixer import Schedule

    return Schedule(**{**d, "phases": tuple(tuple(p) for p in d.get("phases", ()))})


def _progress(stage: StageConfig, idx: int, step: int, steps: int, m: dict[str, float]) -> None:
    loss = m.get("loss", float("nan"))
    print(
        f"[stage {idx}:{stage.name}] step {step}/{steps} loss {loss:.4f} "
        f"rev {m.get('mix/reverse_fraction', 0):.2f} tok/s {m.get('tokens_per_s', 0):.0f}",
        flush=True,
    )


def _call_eval(config: dict, policy, tokenizer, alp_only: bool) -> dict:
    from revmix.platform.evaluation.hooks import evaluate_policy

    return evaluate_policy(config, policy, tokenizer, alp_only=alp_only)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


class RunExistsError(RuntimeError):
    """The output directory already holds a run and ``--resume`` was not given."""


def latest_checkpoint(out_dir: Path, stage_idx: int) -> Path | None:
    root = out_dir / "checkpoints" / f"stage{stage_idx}"
    done = sorted(p for p in root.glob("step_*") if (p / CKPT_STATE).exists()) if root.exists() else []
    return done[-1] if done else None


def _storage_path(cfg: ExperimentConfig, out_dir: Path) -> str:
    sp = cfg.runtime.storage_path
    if sp is None:
        return str(out_dir / "ray")
    return sp if "://" in sp else str(Path(sp).expanduser().absolute())


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    callbacks: list | None = None,
    evaluate: bool = True,
    on_report: Any = None,
) -> dict:
    """Run every stage of ``cfg`` into ``out_dir``; returns (and writes) ``summary.json``.

    ``on_report(record)`` is called with every step's metrics when the loop runs in-process
    (``num_workers = 0``), e.g. to forward them to Tune; with Ray workers pass ``callbacks`` instead.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from revmix.platform.data.prepare import prepare_data, to_ray_datasets
    from revmix.platform.models import load_tokenizer, resolve_model_path

    out_dir = Path(out_dir).expanduser().absolute()
    if (out_dir / "config.yaml").exists() and not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run; pass --resume to continue it or choose a new --out"
        )
    if resume and not (out_dir / "config.yaml").exists():
        raise RunExistsError(f"--resume: {out_dir} holds no run to resume")
    out_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    use_gpu = cfg.runtime.use_gpu if cfg.runtime.use_gpu is not None else torch.cuda.is_available()
    t0 = time.perf_counter()
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.scale, cfg.model.init_seed)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg.data, tokenizer, tokenizer_id=model_path)
    n_fwd, n_rev = len(data.train["forward"]), len(data.train["reverse"])
    workers = cfg.runtime.num_workers
    datasets = to_ray_datasets(data, cfg.data) if workers > 0 else None
    eval_rows = data.test_rows if evaluate else None

    summary: dict[str, Any] = {
        "name": cfg.name,
        "out_dir": str(out_dir),
        "model": model_path,
        "data": {
            "train_items": data.n_items,
            "train_rows": {"forward": n_fwd, "reverse": n_rev},
            "test_rows": len(data.test_rows),
            "truncated_rows": data.truncated,
            "rejected_rows": data.rejected,
        },
        "stages": [],
    }
    init_path = model_path
    for i, stage in enumerate(cfg.stages):
        stage_dir = out_dir / "stages" / str(i)
        if resume and (stage_dir / "result.json").exists():
            result = json.loads((stage_dir / "result.json").read_text())
        else:
            plan = stage_plan(stage, data.n_items, n_fwd, n_rev)
            resume_from = latest_checkpoint(out_dir, i) if resume else None
            loop_config = {
                "experiment": to_dict(cfg),
                "stage": i,
                "init_path": str(init_path),
                "steps": plan["steps"],
                "steps_per_epoch": plan["steps_per_epoch"],
                "schedule": {**plan["schedule"].__dict__},
                "out_dir": str(out_dir),
                "use_gpu": use_gpu,
                "resume_from": str(resume_from) if resume_from else None,
                "inline_data": data.train if workers == 0 else None,
                "eval_rows": eval_rows,
                "stop_after_steps": stop_after_steps,
                "on_report": on_report if workers == 0 else None,
            }
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_config,
                scaling_config=ray.train.ScalingConfig(
                    num_workers=workers,
                    use_gpu=use_gpu,
                    resources_per_worker={"CPU": cfg.runtime.cpus_per_worker} if workers else None,
                ),
                run_config=ray.train.RunConfig(
                    name=f"{cfg.name}-stage{i}-{int(time.time() * 1000)}",
                    storage_path=_storage_path(cfg, out_dir),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.runtime.max_failures),
                    callbacks=callbacks,
                ),
                datasets=datasets,
                dataset_config=ray.train.DataConfig(datasets_to_split="all") if datasets else None,
            )
            trainer.fit()
            result = json.loads((stage_dir / "result.json").read_text())
        summary["stages"].append(_stage_summary(stage, i, result))
        init_path = stage_dir / "model"
    final = out_dir / "model"
    if final.is_symlink() or final.exists():
        final.unlink() if final.is_symlink() else shutil.rmtree(final)
    final.symlink_to(Path("stages") / str(len(cfg.stages) - 1) / "model")
    summary["wall_s"] = time.perf_counter() - t0
    summary["steps"] = sum(s["steps"] for s in summary["stages"])
    summary["final"] = summary["stages"][-1]["final"]
    summary["eval"] = summary["stages"][-1].get("eval")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _stage_summary(stage: StageConfig, idx: int, result: dict) -> dict:
    final = result.get("final", {})
    by_dir = {
        d: {k.rsplit("/", 1)[0]: v for k, v in final.items() if k.endswith("/" + d)} for d in DIRECTIONS
    }
    return {
        "index": idx,
        "name": stage.name,
        "objective": stage.objective.get("name"),
        "steps": result.get("steps"),
        "wall_s": result.get("wall_s"),
        "tokens": result.get("tokens"),
        "tokens_per_s": (result.get("tokens", 0) / result["wall_s"]) if result.get("wall_s") else None,
        "final": final,
        "final_by_direction": by_dir,
        "eval": result.get("eval"),
    }
