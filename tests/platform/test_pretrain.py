"""The pretrained tiny base: corpus disjoint from evaluation items, cached by key, rebuilt on a new key."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from revmix.config import load_config
from revmix.platform import models as M
from revmix.platform import pretrain as P
from revmix.platform.data import cache, synthetic
from revmix.platform.evaluation.benchmarks import load_benchmark

# A build that takes seconds: a few steps on a small corpus, a small reserved pool.
FAST = P.PretrainSpec(
    families=("affine_mod", "arith_chain", "string_ops"),
    facts_per_family=40,
    steps=4,
    batch_size=2,
    seq_len=64,
    warmup_steps=2,
    reserved_items=30,
)


def test_corpus_avoids_every_reserved_fact():
    for family in FAST.families:
        corpus = set(P.corpus_facts(family, FAST, seed=0))
        assert len(corpus) == FAST.facts_per_family
        for s in FAST.reserved_seeds:
            assert corpus.isdisjoint(synthetic.facts(family, FAST.reserved_items, s))


def test_default_corpus_never_holds_a_quickstart_item():
    """By prompt, the strongest form: no row the quickstart trains or evaluates on (either direction)
    is a pretraining row, while the corpus does hold the same kind of question."""
    cfg = load_config("configs/runs/sft_then_dpo_tiny.yaml", ["data.n_items=600"])
    corpus = {r["prompt"] for r in P.corpus_rows(P.DEFAULT_SPEC, seed=0)}
    run_rows = synthetic.generate_mix(cfg.data.families, cfg.data.n_items, cfg.data.seed)
    held_out = load_benchmark("synthetic", synthetic_families=cfg.data.families, synthetic_n=cfg.data.n_items)
    assert len(held_out) >= 200
    assert corpus.isdisjoint(r["prompt"] for r in run_rows)
    assert corpus.isdisjoint(it.prompt for it in held_out)
    tasks = {p.split(" Given ")[0].split(",")[0] for p in corpus}
    assert any(t.startswith("Let y = (") for t in tasks) and any(t.startswith("Start from x") for t in tasks)


def test_check_disjoint_refuses_runs_outside_the_reserved_pool():
    P.check_disjoint(["affine_mod", "arith_chain"], 2 * P.DEFAULT_SPEC.reserved_items, data_seed=3)
    with pytest.raises(ValueError, match=r"data.seed=9 .* avoids only data seeds \[0, 1, 2, 3\]"):
        P.check_disjoint(["affine_mod"], 10, data_seed=9)
    with pytest.raises(ValueError, match=r"2001 per family"):
        P.check_disjoint(["affine_mod"], P.DEFAULT_SPEC.reserved_items + 1, data_seed=0)


def test_config_checks_a_pretrained_base_before_anything_runs():
    base = "configs/runs/sft_tiny.yaml"
    assert load_config(base, ["model.base=pretrained"]).model.base == "pretrained"
    with pytest.raises(ValueError, match="data.seed=7"):
        load_config(base, ["model.base=pretrained", "data.seed=7"])
    with pytest.raises(ValueError, match="model.base=pretrained builds a tiny model"):
        load_config(base, ["model.base=pretrained", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"])


def test_spec_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"unknown \['nope'\]; valid: \['affine_mod'"):
        P.PretrainSpec(families=("nope",))
    with pytest.raises(ValueError, match="PretrainSpec.steps must be >= 1"):
        P.PretrainSpec(steps=0)


def test_base_is_built_once_per_key_and_rebuilt_when_it_changes(tmp_path):
    first = P.pretrained_model_dir("tiny", seed=0, spec=FAST, cache_dir=tmp_path, shipped_dir=None)
    assert P.pretrained_model_dir("tiny", seed=0, spec=FAST, cache_dir=tmp_path) == first
    root = tmp_path / "pretrained"
    assert [b["key"] for b in cache.builds(root)] == [first.name]  # the second call built nothing
    meta = json.loads((first / cache.META).read_text())
    assert meta["spec"]["steps"] == 4 and meta["corpus_rows"] == 2 * 40 * 3
    # Pretraining moved the weights away from the seeded random init it started from.
    init = safetensors.torch.load_file(M.tiny_model_dir("tiny", 0, cache_dir=tmp_path) / "model.safetensors")
    trained = safetensors.torch.load_file(first / "model.safetensors")
    assert not torch.equal(init["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    # It loads as any model does; a changed spec or seed is a new key, built anew.
    assert M.load_model(str(first)).config.hidden_size == M.SCALES["tiny"].hidden_size
    longer = P.pretrained_model_dir(
        "tiny", seed=0, spec=P.PretrainSpec(**{**FAST.__dict__, "steps": 5}), cache_dir=tmp_path
    )
    other_seed = P.pretrained_model_dir("tiny", seed=1, spec=FAST, cache_dir=tmp_path)
    assert len({first, longer, other_seed}) == 3
    assert len(cache.builds(root)) == 3


def test_base_model_path_picks_the_base(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(
        P, "pretrained_model_dir", lambda scale, seed: built.append((scale, seed)) or tmp_path
    )
    assert P.base_model_path(None, "small", 2, base="pretrained") == str(tmp_path)
    assert P.base_model_path("tiny:base", "tiny", 0, base="pretrained") == str(tmp_path)
    assert built == [("small", 2), ("base", 0)]
    with pytest.raises(ValueError, match="unknown model base 'warm'; valid: random, pretrained"):
        P.base_model_path(None, base="warm")


def test_the_default_base_ships_for_its_current_key():
    """Changing the default spec, the corpus generator or the tokenizer changes the key: the shipped copy
    must then be rebuilt (``python -m revmix.platform.pretrain``), or a fresh machine trains it for minutes."""
    name, key = P._key("tiny", 0, P.DEFAULT_SPEC)
    shipped = P.SHIPPED_DIR / name
    assert (shipped / "meta.json").is_file(), (
        f"no shipped base {name}: run python -m revmix.platform.pretrain"
    )
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["spec"] == json.loads(json.dumps(key["spec"])) and meta["spec"]["steps"] >= 1000
    assert {"cpu", "threads", "torch"} <= set(meta["built_on"])


def test_a_fresh_cache_copies_the_shipped_base_which_knows_the_tasks(tmp_path):
    entry = P.pretrained_model_dir("tiny", seed=0, cache_dir=tmp_path)
    meta = json.loads((entry / cache.META).read_text())
    assert meta["source"].startswith("shipped with revmix")
    name, _ = P._key("tiny", 0, P.DEFAULT_SPEC)
    shipped = safetensors.torch.load_file(P.SHIPPED_DIR / name / "model.safetensors")
    copied = safetensors.torch.load_file(entry / "model.safetensors")
    assert shipped.keys() == copied.keys() and all(torch.equal(shipped[k], copied[k]) for k in shipped)
    # Held-out rows of the quickstart's families: the shipped base predicts them far better than the
    # random model it started from (a loss gap of nats per token, not noise).
    tok = M.load_tokenizer(str(entry))
    rows = [it for it in load_benchmark("synthetic", synthetic_families=list(P.DEFAULT_SPEC.families))][:16]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.response}],
            tokenize=False,
        )
        for it in rows
    ]
    losses = {}
    for label, path in (("random", M.tiny_model_dir("tiny", 0, cache_dir=tmp_path)), ("pretrained", entry)):
        model = M.load_model(str(path))
        with torch.no_grad():
            losses[label] = sum(
                float(model(input_ids=ids, labels=ids).loss)
                for ids in (torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in texts)
            ) / len(texts)
    assert losses["pretrained"] < losses["random"] - 3.0, losses


def test_a_shipped_copy_whose_record_disagrees_is_refused(tmp_path):
    name, _ = P._key("tiny", 0, FAST)
    fake = tmp_path / "shipped" / name
    fake.mkdir(parents=True)
    (fake / "meta.json").write_text(json.dumps({"spec": {"steps": 1}}))
    with pytest.raises(ValueError, match="does not record the key its folder name says"):
        P.pretrained_model_dir(
            "tiny", 0, FAST, cache_dir=tmp_path / "cache", shipped_dir=tmp_path / "shipped"
        )
    assert not list((tmp_path / "cache" / "pretrained").glob(name + "*"))  # nothing left behind
