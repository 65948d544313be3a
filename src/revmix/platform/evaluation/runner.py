"""The eval runner: benchmark accuracy (per direction) and the ALP table for one model.

``evaluate`` takes a model path / run directory, an in-memory model (the training loop's live policy; pass
``tokenizer``) or any ``Generator`` (hf, vllm, an OpenAI-compatible endpoint). Per benchmark it
chat-formats the questions, decodes in batches (greedy, or n samples per item scored as mean accuracy,
pass@k and maj@k: :mod:`.sampled`), extracts and checks answers (``answers.score_completion``:
math-verify, letters, exact), and — where items carry both directions'
solutions (the synthetic task, JSONL with ``response``/``other_response``) — scores ALP(y+), ALP(y−) and
the margin with the generator's batched ``score``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from revmix.platform.evaluation import alp as alp_mod
from revmix.platform.evaluation.answers import answer_key, score_completion
from revmix.platform.evaluation.sampled import sample_metrics
from revmix.platform.generation.protocol import SamplingParams, as_generator, prepare_prompts

Scorer = Callable[[str, str, str], bool]


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
    ks: Sequence[int] | None = None,
    one_call: bool = False,
    alp: bool = True,
    benchmark_kwargs: dict[str, dict[str, Any]] | None = None,
    scorer: Scorer = score_completion,
    progress: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy per benchmark (overall and per direction) and ALP; see the module docstring.

    ``benchmarks`` is a list of names for ``load_benchmark`` (``benchmark_kwargs[name]`` are passed to it,
    e.g. the synthetic split's families and seed) or a dict name → items already loaded. ``sampling``
    defaults to greedy with ``max_new_tokens``; with ``sampling.n`` > 1 accuracy is the mean over the
    samples, and pass@k / maj@k are added for each k in ``ks`` (default ``[1, n]``; :mod:`.sampled`).
    ``one_call`` sends every benchmark's prompts in one ``generate`` call (a Ray Data LLM generator
    starts its engines once per call). Returns::

        {"benchmarks": {name: {"accuracy", "n", "samples", "pass@k"?, "maj@k"?,
                               "by_direction": {dir: {"accuracy", "n", "pass@k"?, "maj@k"?}}, "alp"?}},
         "alp": {"forward": {...}, "reverse": {...}} | {},   # pooled over benchmarks with twins
         "seconds": float, "predictions": [...]  # the latter only with return_predictions}
    """
    gen = as_generator(model_path_or_generator, generator, endpoint, tokenizer, batch_size)
    params = sampling or SamplingParams(max_new_tokens=max_new_tokens)
    ks = sorted(set(ks if ks is not None else ([1, params.n] if params.n > 1 else [])))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmarks": {}, "alp": {}}
    predictions: list[dict[str, Any]] = []
    alp_records: list[dict[str, Any]] = []
    loaded = _load_all(benchmarks, limit, benchmark_kwargs or {})
    chunk = None if one_call else max(1, batch_size) * 4  # progress granularity; decoded in batches
    samples = _generate_all(gen, loaded, params, chunk, progress)
    for name, items in loaded.items():
        completions = samples[name]
        correct = [[bool(scorer(c, it.answer, it.kind)) for c in row] for row, it in zip(completions, items)]
        keys = [[answer_key(c, it.kind) for c in row] for row, it in zip(completions, items)] if ks else []
        entry = _benchmark_entry(items, correct, keys, ks)
        if alp and any(it.response and it.other_response for it in items):
            records = _alp_records(gen, items, alp_tokens, name, progress)
            if records is not None:
                entry["alp"] = alp_mod.summarize(records)
                alp_records.extend(records)
        result["benchmarks"][name] = entry
        if return_predictions:
            predictions.extend(_predictions(name, items, completions, correct))
    if alp_records:
        result["alp"] = alp_mod.summarize(alp_records)
    result["seconds"] = time.perf_counter() - t0
    if return_predictions:
        result["predictions"] = predictions
    return result


def _generate_all(
    gen: Any, loaded: dict[str, list[Any]], params: SamplingParams, chunk: int | None, progress: bool
) -> dict[str, list[list[str]]]:
    """``params.n`` completions per item of every benchmark: one call in all (``chunk`` None) or chunks
    of ``chunk`` prompts per benchmark with a progress bar."""
    from tqdm.auto import tqdm

    prompts = {name: prepare_prompts(gen, [it.prompt for it in items]) for name, items in loaded.items()}
    if chunk is None:
        flat = gen.generate([p for ps in prompts.values() for p in ps], params)
        out, start = {}, 0
        for name, ps in prompts.items():
            out[name], start = flat[start : start + len(ps)], start + len(ps)
        return out
    out = {}
    for name, ps in prompts.items():
        rows: list[list[str]] = []
        with tqdm(total=len(ps), desc=f"eval {name}", unit="item", disable=not progress) as bar:
            for start in range(0, len(ps), chunk):
                rows.extend(gen.generate(ps[start : start + chunk], params))
                bar.update(len(ps[start : start + chunk]))
        out[name] = rows
    return out


def _benchmark_entry(
    items: Sequence[Any], correct: list[list[bool]], keys: list[list[str | None]], ks: Sequence[int]
) -> dict[str, Any]:
    """Mean accuracy (and pass@k / maj@k for ``ks``) over all items and per direction."""

    def metrics(idx: list[int]) -> dict[str, Any]:
        found = sample_metrics([correct[i] for i in idx], [keys[i] for i in idx] if ks else [], ks)
        return {"accuracy": found.pop("accuracy"), "n": len(idx), **found}

    by_dir = {
        d: metrics([i for i, it in enumerate(items) if it.direction == d])
        for d in sorted({it.direction for it in items if it.direction})
    }
    samples = len(correct[0]) if correct else 0
    return {**metrics(list(range(len(items)))), "samples": samples, "by_direction": by_dir}


def _predictions(
    name: str, items: Sequence[Any], completions: list[list[str]], correct: list[list[bool]]
) -> list[dict[str, Any]]:
    """One record per item: the first sample as ``completion`` / ``correct``, all of them when n > 1."""
    out = []
    for it, row, flags in zip(items, completions, correct):
        record = {
            "benchmark": name,
            "id": it.id,
            "direction": it.direction,
            "answer": it.answer,
            "completion": row[0],
            "correct": flags[0],
        }
        if len(row) > 1:
            record.update(samples=row, samples_correct=flags)
        out.append(record)
    return out


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
