"""Every shipped run config trains end to end (shortened), and SFT → DPO chains its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from revmix.config import load_config
from revmix.objectives.base import sequence_logps
from revmix.platform.data.tokenize import collate
from revmix.platform.train import run_experiment
from revmix.validation import load_raw

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "runs").glob("*_tiny.yaml"))


def short(path: Path, steps: int = 2) -> list[str]:
    over = ["data.n_items=40", "eval.limit=4", "eval.alp_limit=4"]
    for i, st in enumerate(load_raw(path)["stages"]):
        over += [f"stages.{i}.steps={steps}", f"stages.{i}.batch_size=4", f"stages.{i}.checkpoint_every=0"]
        if st.get("objective", {}).get("name") == "ppo":  # rollouts dominate: keep them short here
            over += [f"stages.{i}.objective.max_new_tokens=16", f"stages.{i}.objective.ppo_epochs=1"]
    return over


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_run_config_trains(path, tmp_path):
    cfg = load_config(path, short(path))
    summary = run_experiment(cfg, tmp_path / "run", evaluate=False)
    assert len(summary["stages"]) == len(cfg.stages)
    for st in summary["stages"]:
        assert (
            st["steps"] == 2 and st["final_by_direction"]["forward"] and st["final_by_direction"]["reverse"]
        )
    if path.stem == "curriculum_tiny":  # forward first, then reverse
        recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["mix/reverse_fraction"] for r in recs] == [0.0, 1.0]


def test_dpo_reference_is_the_previous_stage_policy(tmp_path):
    """Stage 2's reference log-probs (adapter disabled) equal the stage-1 final policy's log-probs."""
    from revmix.objectives.reference import AdapterDisabledReference, reference_logps
    from revmix.platform.data.prepare import prepare_data
    from revmix.platform.models import LoraSpec, apply_lora, load_model, load_tokenizer

    path = ROOT / "configs" / "runs" / "sft_then_dpo_tiny.yaml"
    cfg = load_config(path, [*short(path), "stages.1.steps=1"])
    run_experiment(cfg, tmp_path / "run", evaluate=False)
    stage1 = tmp_path / "run" / "stages" / "0" / "model"
    tok = load_tokenizer(str(stage1))
    data = prepare_data(cfg.data, tok, str(stage1))
    batch = collate(data.train["forward"][:2] + data.train["reverse"][:2], tok.pad_token_id)

    sft_policy = load_model(str(stage1))
    with torch.no_grad():
        out = sft_policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = sequence_logps(out, batch.labels)

    # Stage 2 as the loop builds it: stage-1 model + a fresh adapter; its trained adapter moves the policy.
    lo = cfg.model.lora
    policy = apply_lora(
        load_model(str(stage1)), LoraSpec(lo.r, lo.alpha, lo.dropout, tuple(lo.target_modules))
    )
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    chosen, _ = reference_logps(AdapterDisabledReference(policy), batch)
    assert torch.allclose(chosen, expected, atol=1e-5)
    moved = sequence_logps(
        policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
    )
    assert not torch.allclose(moved, expected, atol=1e-3)  # the check can fail: the adapter matters


def test_the_starting_model_is_evaluated_first_when_asked(tmp_path):
    """``eval.at_start``: the base model's evaluation on the stage-end items, flattened as ``start/eval/...``;
    a stage at lr 1e-12 leaves the model as it was, so its stage-end accuracy is the starting one."""
    from revmix.sweeps.results import flatten_summary

    path = ROOT / "configs" / "runs" / "sft_tiny.yaml"
    over = [*short(path, steps=1), "eval.max_new_tokens=8", "eval.at_start=true", "stages.0.lr=1e-12"]
    summary = run_experiment(load_config(path, over), tmp_path / "run")
    start, end = summary["start_eval"]["benchmarks"]["synthetic"], summary["eval"]["benchmarks"]["synthetic"]
    assert start["n"] == end["n"] > 0 and start["items"] == end["items"]
    flat = flatten_summary(summary)
    assert flat["start/eval/accuracy/synthetic"] == flat["eval/accuracy/synthetic"]
    # Kept in the run: a resume reads it back instead of evaluating the starting model again.
    kept = tmp_path / "run" / "start_eval.json"
    assert json.loads(kept.read_text()) == summary["start_eval"]
    kept.write_text(json.dumps({"benchmarks": {}, "alp": {}, "marker": "kept"}))
    resumed = run_experiment(load_config(path, over), tmp_path / "run", resume=True)
    assert resumed["start_eval"]["marker"] == "kept"
