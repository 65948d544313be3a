"""The eval runner: benchmark accuracy (per direction) and the ALP table for one model.

``evaluate`` takes a model path / run directory, an in-memory model (the training loop's live policy; pass
``tokenizer``) or any ``Generator`` (hf, vllm, an OpenAI-compatible endpoint). Per benchmark it
chat-formats the questions, decodes greedily in batches, extracts and checks answers
(``answers.score_completion``: math-verify, letters, exact), and — where items carry both directions'
solutions (the synthetic task, JSONL with ``response``/``other_response``) — scores ALP(y+), ALP(y−) and
the margin with the generator's batched ``score``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from revmix.platform.evaluation import alp as alp_mod
from revmix.platform.evaluation.answers import score_completion
from revmix.platform.generation.protocol import SamplingParams, as_generator, prepare_prompts

Scorer = Callable[[str, str, str], bool]


def _accuracy(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def evaluate(
    model_path_or_generator: Any,
    benchmarks: Sequence[str] | dict[str, Sequence[Any]],
    limit: int | None = None,
    max_new_tokens: int = 512,
    alp_tokens: int = alp_mod.N_TOKENS,
    *,
    generator: str = "hf",
    endpoint: str | None = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    sampling: SamplingParams | None = None,
    alp: bool = True,
    benchmark_kwargs: dict[str, dict[str, Any]] | None = None,
    scorer: Scorer = score_completion,
    progress: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy per benchmark (overall and per direction) and ALP; see the module docstring.

    ``benchmarks`` is a list of names for ``load_benchmark`` (``benchmark_kwargs[name]`` are passed to it,
    e.g. the synthetic split's families and seed) or a dict name → items already loaded. ``sampling``
    defaults to greedy with ``max_new_tokens``. Returns::

        {"benchmarks": {name: {"accuracy", "n", "by_direction": {dir: {"accuracy", "n"}}, "alp"?}},
         "alp": {"forward": {...}, "reverse": {...}} | {},   # pooled over benchmarks with twins
         "seconds": float, "predictions": [...]  # the latter only with return_predictions}
    """
    from tqdm.auto import tqdm

    gen = as_generator(model_path_or_generator, generator, endpoint, tokenizer, batch_size)
    params = sampling or SamplingParams(max_new_tokens=max_new_tokens)
    chunk = max(1, batch_size) * 4  # progress granularity; each chunk is still decoded in batches
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmarks": {}, "alp": {}}
    predictions: list[dict[str, Any]] = []
    alp_records: list[dict[str, Any]] = []
    for name, items in _load_all(benchmarks, limit, benchmark_kwargs or {}).items():
        prompts = prepare_prompts(gen, [it.prompt for it in items])
        completions: list[str] = []
        with tqdm(total=len(items), desc=f"eval {name}", unit="item", disable=not progress) as bar:
            for start in range(0, len(prompts), chunk):
                out = gen.generate(prompts[start : start + chunk], params)
                completions.extend(row[0] for row in out)
                bar.update(len(out))
        correct = [bool(scorer(c, it.answer, it.kind)) for c, it in zip(completions, items)]
        by_dir: dict[str, dict[str, Any]] = {}
        for direction in sorted({it.direction for it in items if it.direction}):
            flags = [f for f, it in zip(correct, items) if it.direction == direction]
            by_dir[direction] = {"accuracy": _accuracy(flags), "n": len(flags)}
        entry: dict[str, Any] = {"accuracy": _accuracy(correct), "n": len(items), "by_direction": by_dir}
        if alp and any(it.response and it.other_response for it in items):
            records = _alp_records(gen, items, alp_tokens, name, progress)
            if records is not None:
                entry["alp"] = alp_mod.summarize(records)
                alp_records.extend(records)
        result["benchmarks"][name] = entry
        if return_predictions:
            predictions.extend(
                {
                    "benchmark": name,
                    "id": it.id,
                    "direction": it.direction,
                    "answer": it.answer,
                    "completion": c,
                    "correct": f,
                }
                for it, c, f in zip(items, completions, correct)
            )
    if alp_records:
        result["alp"] = alp_mod.summarize(alp_records)
    result["seconds"] = time.perf_counter() - t0
    if return_predictions:
        result["predictions"] = predictions
    return result


def _load_all(
    benchmarks: Sequence[str] | dict[str, Sequence[Any]], limit: int | None, kwargs: dict[str, dict[str, Any]]
) -> dict[str, list[Any]]:
    if isinstance(benchmarks, dict):
        return {
            name: list(items)[:limit] if limit is not None else list(items)
            for name, items in benchmarks.items()
        }
    if isinstance(benchmarks, str):
        raise TypeError(
            f"benchmarks must be a list of names, got the string {benchmarks!r}; use [{benchmarks!r}]"
        )
    from revmix.platform.evaluation.benchmarks import load_benchmark

    return {name: load_benchmark(name, limit=limit, **kwargs.get(name, {})) for name in benchmarks}


def _alp_records(
    gen: Any, items: Sequence[Any], n_tokens: int, name: str, progress: bool
) -> list[dict[str, Any]] | None:
    """ALP records for ``items``, or None (with a warning) when the generator cannot score."""
    import warnings

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    step = 64
    try:
        with tqdm(total=len(items), desc=f"alp {name}", unit="item", disable=not progress) as bar:
            for start in range(0, len(items), step):
                records.extend(alp_mod.score_items(gen, items[start : start + step], n_tokens))
                bar.update(len(items[start : start + step]))
    except NotImplementedError as e:
        warnings.warn(f"ALP skipped for {name}: {e}", stacklevel=2)
        return None
    return records
