"""A pretrained tiny base: plain causal-LM pretraining on generated task text, built once and cached.

Why: the paper (arXiv 2509.13079) fine-tunes a *pretrained* instruct model. A randomly initialised 1M-param
Qwen2 fine-tuned on a few hundred items learns the answer format but almost none of the maths, so its
held-out accuracy (a few percent) says little about the data mix. Pretraining the tiny model once on many
generated facts of the task families — both directions, in the solution step formats — gives the
fine-tuning stages a base that can already compute, as a real base model can.

The corpus: facts ``(params, premise)`` drawn from each family's own sampler with a random stream of its
own (namespace :data:`CORPUS_NAMESPACE`), every fact rendered as its forward row and its reverse twin in the
chat template, and packed into fixed-length sequences; the loss covers every token (plain causal LM, all
weights trained: no LoRA).

Disjointness from evaluation: every fact among the first :attr:`PretrainSpec.reserved_items` facts of each
family for each data seed in :attr:`PretrainSpec.reserved_seeds` — the pool from which
``generate``/``generate_mix`` draw *all* training and held-out items of runs with those seeds — is left out
of the corpus (:func:`corpus_facts`). A run on a pretrained base checks that its data lies inside that pool
(:func:`check_disjoint`), so its held-out items (and its fine-tuning items) were never pretrained on.

Cached by content like :func:`~revmix.platform.models.tiny_model_dir`: the key hashes the spec (generator
version, corpus size, steps, optimiser settings), the scale, the seed and the tokenizer hash; the build runs
under :func:`~revmix.platform.data.cache.build_once`'s lock, so concurrent trials build it once.

Shipped: the default base (3,000 steps, 12.3M tokens; its build record gives the seconds it took) is built by this module once and its
weights ship in the package (:data:`SHIPPED_DIR`, with the build record: key, losses, seconds, CPU, torch);
a cache without the entry copies them when the key it computes is the shipped one, and trains otherwise.
Same recipe, same machine and software: the same weights; another CPU family: another draw of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revmix.platform.data import synthetic
from revmix.platform.data.cache import build_once

if TYPE_CHECKING:  # torch loads only when a base is built: config validation imports this module
    import torch

CORPUS_NAMESPACE = "revmix.pretrain"
"""The corpus's random stream: distinct from ``revmix.synthetic`` (the items runs train and evaluate on)."""

GENERATOR_VERSION = 1
"""Bump when the corpus rendering or the training loop changes: old cache entries are then not reused."""


@dataclass(frozen=True)
class PretrainSpec:
    """What the pretrained base is built from; every field takes part in the cache key."""

    families: tuple[str, ...] = ("affine_mod", "arith_chain")
    facts_per_family: int = 4000  # corpus facts of each family (each gives a forward and a reverse row)
    steps: int = 3000  # optimiser steps
    batch_size: int = 16  # packed sequences per step
    seq_len: int = 256  # tokens per packed sequence
    lr: float = 3e-3  # peak AdamW learning rate (linear warmup, cosine decay to 10%)
    warmup_steps: int = 30
    weight_decay: float = 0.01
    reserved_seeds: tuple[int, ...] = (0, 1, 2, 3)  # data seeds whose item pool the corpus avoids
    reserved_items: int = 2000  # facts per family of each reserved seed's pool

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in synthetic.FAMILIES]
        if bad or not self.families:
            raise ValueError(
                f"PretrainSpec.families {list(self.families)}: unknown {bad}; valid: {synthetic.family_names()}"
            )
        for name in ("facts_per_family", "steps", "batch_size", "seq_len", "reserved_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"PretrainSpec.lr must be > 0, got {self.lr}")

    def key_dict(self) -> dict[str, Any]:
        return {"generator": GENERATOR_VERSION, **dataclasses.asdict(self)}


DEFAULT_SPEC = PretrainSpec()


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def reserved_facts(family: str, spec: PretrainSpec) -> set[tuple[Any, str]]:
    """The evaluation-side pool of ``family``: every fact a run with a reserved data seed can train or
    evaluate on while it asks for at most ``reserved_items`` facts of the family (``generate`` is
    prefix-stable, so smaller runs draw a prefix of it)."""
    return {f for s in spec.reserved_seeds for f in synthetic.facts(family, spec.reserved_items, s)}


def corpus_facts(family: str, spec: PretrainSpec, seed: int) -> list[tuple[Any, str]]:
    """``spec.facts_per_family`` distinct facts of ``family`` from the corpus stream, none reserved.

    Draws from the family's sampler (the evaluation items' distribution) and skips reserved facts; fails
    loudly when the family cannot supply that many (small fact spaces such as ``affine_mod``)."""
    reserved = reserved_facts(family, spec)
    wanted = spec.facts_per_family
    pool = synthetic.facts(family, wanted + len(reserved), seed, namespace=CORPUS_NAMESPACE)
    chosen = [f for f in pool if f not in reserved][:wanted]
    if len(chosen) < wanted:
        raise ValueError(
            f"pretrain corpus: {family} has only {len(chosen)} unreserved facts, wanted {wanted}"
        )
    return chosen


def corpus_rows(spec: PretrainSpec, seed: int) -> list[dict[str, Any]]:
    """Forward and reverse rows of every corpus fact, families interleaved, in a seeded shuffled order."""
    rows = [
        row
        for family in spec.families
        for i, (p, x) in enumerate(corpus_facts(family, spec, seed))
        for row in synthetic.twins(family, f"pretrain-{family}-{i:05d}", p, x)
    ]
    random.Random(f"{CORPUS_NAMESPACE}/order/{seed}").shuffle(rows)
    return rows


def check_disjoint(
    families: list[str], n_items: int, data_seed: int, spec: PretrainSpec = DEFAULT_SPEC
) -> None:
    """Raise unless a synthetic run's items (``generate_mix(families, n_items, data_seed)``) all lie in
    the pool the corpus avoided: its seed reserved and at most ``reserved_items`` facts per family."""
    per_family = math.ceil(n_items / max(len(families), 1))
    if data_seed not in spec.reserved_seeds or per_family > spec.reserved_items:
        raise ValueError(
            f"model.base=pretrained: data.seed={data_seed} with data.n_items={n_items} over {len(families)} "
            f"families ({per_family} per family) may overlap the pretraining corpus; it avoids only data "
            f"seeds {list(spec.reserved_seeds)} with at most {spec.reserved_items} items per family"
        )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _packed(tokenizer: Any, rows: list[dict[str, Any]], seq_len: int) -> torch.Tensor:
    """Every row rendered in the chat template and concatenated, cut into ``[n, seq_len]`` sequences."""
    import torch

    chats = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in rows
    ]
    texts = tokenizer.apply_chat_template(chats, tokenize=False)
    stream = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_at(step: int, spec: PretrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _batches(data: torch.Tensor, spec: PretrainSpec, seed: int) -> Iterator[torch.Tensor]:
    """``spec.steps`` batches, epochs of seeded permutations of the packed sequences."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    for _ in range(spec.steps):
        if pos + spec.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        yield data[order[pos : pos + spec.batch_size]]
        pos += spec.batch_size


def pretrain(model: torch.nn.Module, data: torch.Tensor, spec: PretrainSpec, seed: int) -> list[float]:
    """Full fine-tune ``model`` as a causal LM on the packed ``data``; the per-step losses."""
    import torch

    if len(data) < spec.batch_size:
        raise ValueError(
            f"pretrain: corpus packs into {len(data)} sequences of {spec.seq_len}, fewer than batch_size={spec.batch_size}"
        )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, batch in enumerate(_batches(data, spec, seed)):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, spec)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# Build + cache
# --------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    """Where a base was built: float results of the same recipe differ across CPU families and software."""
    import platform

    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in _read_lines("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def _build(out: Path, init: Path, seed: int, spec: PretrainSpec, key: dict[str, Any]) -> dict[str, Any]:
    """Pretrain the random model ``init`` into ``out`` (model, tokenizer, build record); the record."""
    from revmix.platform.models import load_model, load_tokenizer

    start = time.monotonic()
    tokenizer = load_tokenizer(str(init))
    model = load_model(str(init))
    rows = corpus_rows(spec, seed)
    data = _packed(tokenizer, rows, spec.seq_len)
    losses = pretrain(model, data, spec, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    info = {
        **key,
        "corpus_rows": len(rows),
        "corpus_tokens": int(data.numel()),
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.monotonic() - start, 1),
        "built_on": _machine(),
    }
    return info  # build_once stores it as the entry's meta.json


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "pretrained"
"""Bases this module built and the package ships (``python -m revmix.platform.pretrain`` writes one): the
default base trains on 12.3M tokens, far longer than the quickstart may, so a fresh machine copies
the shipped weights into its cache instead of training them, when their key is the key it would build."""

_SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors")


def _key(scale: str, seed: int, spec: PretrainSpec) -> tuple[str, dict[str, Any]]:
    """The cache entry name and the dict it hashes: spec (generator version included) + scale shape +
    seed + tokenizer hash."""
    from revmix.platform import models

    key = {
        "spec": spec.key_dict(),
        "scale": scale,
        "shape": models.SCALES[scale]._asdict(),
        "seed": seed,
        "tokenizer": models.tokenizer_hash(models.VOCAB_SIZE),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"qwen2-{scale}-pretrained-seed{seed}-{digest}", key


def _from_shipped(out: Path, init: Path, shipped: Path, key: dict[str, Any]) -> dict[str, Any]:
    """Fill ``out`` with the shipped weights of ``key`` and the locally built tokenizer; the record."""
    from revmix.platform.models import load_tokenizer

    record = json.loads((shipped / "meta.json").read_text(encoding="utf-8"))
    if {k: record.get(k) for k in key} != json.loads(json.dumps(key)):
        raise ValueError(f"{shipped}/meta.json does not record the key its folder name says; rebuild it")
    for name in _SHIPPED_FILES:
        shutil.copyfile(shipped / name, out / name)
    load_tokenizer(str(init)).save_pretrained(out)
    return {**record, "source": f"shipped with revmix ({shipped.name}), built where 'built_on' says"}


def pretrained_model_dir(
    scale: str,
    seed: int = 0,
    spec: PretrainSpec = DEFAULT_SPEC,
    cache_dir: str | Path | None = None,
    shipped_dir: Path | None = SHIPPED_DIR,
) -> Path:
    """Directory of the pretrained tiny base of ``scale``: cached; on first use copied from the package's
    shipped build of the same key (:data:`SHIPPED_DIR`), else built here: the shipped tiny base took 58 min
    on 2 CPU threads; ``small`` and ``base`` cost about 5x and 20x that (their SFT throughput).

    A new key builds a new entry, an old one is never served for it; ``shipped_dir=None`` always builds."""
    from revmix.platform import models

    root = Path(cache_dir) if cache_dir is not None else models._default_cache_dir()
    init = models.tiny_model_dir(scale, seed, cache_dir=root)  # checks scale and seed
    name, key = _key(scale, seed, spec)
    shipped = shipped_dir / name if shipped_dir is not None else None
    if shipped is not None and (shipped / "meta.json").is_file():
        build = lambda tmp: _from_shipped(tmp, init, shipped, key)  # noqa: E731
    else:
        build = lambda tmp: _build(tmp, init, seed, spec, key)  # noqa: E731
    entry, _ = build_once(root / "pretrained", name, build)
    return entry


def ship(scale: str = "tiny", seed: int = 0, spec: PretrainSpec = DEFAULT_SPEC) -> Path:
    """Build the base of ``(scale, seed, spec)`` here from scratch (never from a shipped copy) and write
    its weights and build record into :data:`SHIPPED_DIR`; the folder written."""
    import tempfile

    name, _ = _key(scale, seed, spec)
    with tempfile.TemporaryDirectory() as tmp:
        entry = pretrained_model_dir(scale, seed, spec, cache_dir=tmp, shipped_dir=None)
        target = SHIPPED_DIR / name
        target.mkdir(parents=True, exist_ok=True)
        for f in _SHIPPED_FILES:
            shutil.copyfile(entry / f, target / f)
        shutil.copyfile(entry / "meta.json", target / "meta.json")
    return target


BASES: tuple[str, ...] = ("random", "pretrained")
"""What a tiny model's weights are (``model.base``): seeded random, or pretrained once on generated task text."""


def base_model_path(
    name_or_path: str | None, scale: str = "tiny", seed: int = 0, base: str = "random"
) -> str:
    """:func:`revmix.platform.models.resolve_model_path` with ``model.base``: ``pretrained`` gives the tiny
    model's pretrained base (:func:`pretrained_model_dir`, built on first use); only tiny models have one."""
    from revmix.platform import models

    if base not in BASES:
        raise ValueError(f"unknown model base {base!r}; valid: {', '.join(BASES)}")
    if base == "random":
        return models.resolve_model_path(name_or_path, scale, seed)
    tiny = models.tiny_scale_of(name_or_path, scale)
    if tiny is None:
        raise ValueError(
            f"model.base=pretrained builds a tiny model; model.name_or_path={name_or_path!r} names another"
        )
    return str(pretrained_model_dir(tiny, seed))


if __name__ == "__main__":  # python -m revmix.platform.pretrain: rebuild the shipped default base
    print(ship())
