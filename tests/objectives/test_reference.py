"""Reference policies: adapter-disabled LoRA model, frozen copy and the on-disk cache agree."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from revmix.objectives.base import build_objective, policy_logits
from revmix.objectives.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    ReferenceLogpCache,
    cache_key,
    files_identity,
    hash_state_dict,
    reference_logps,
    response_token_counts,
)
from tests.objectives.helpers import make_batch, responses, row_token_logps, tiny_lm


def _lora_policy(seed: int = 0):
    """(LoRA PeftModel with non-zero random B matrices and dropout, frozen copy of its base)."""
    base = tiny_lm(seed)
    frozen = FrozenCopyReference(base)  # before get_peft_model injects LoRA layers into `base`
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
    )
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    model.train()  # LoRA dropout active in the policy: the reference must not see it
    return model, frozen


def test_three_references_give_the_same_dpo_loss(tmp_path):
    policy, frozen = _lora_policy()
    batch = make_batch(seed=2, batch_size=6)
    dpo = build_objective({"name": "dpo", "beta": 1.0})

    # The adapter matters: policy and base disagree (so equal losses below are not trivially log 2).
    ids, mask = batch.input_ids, batch.attention_mask
    policy.eval()
    assert not torch.allclose(policy_logits(policy, ids, mask), frozen.logits(ids, mask), atol=1e-2)
    policy.train()

    adapter_off = AdapterDisabledReference(policy)
    logits_off = adapter_off.logits(ids, mask)
    assert policy.training, "AdapterDisabledReference must restore train mode"
    assert torch.allclose(logits_off, frozen.logits(ids, mask), atol=1e-6)
    assert not logits_off.requires_grad

    key = cache_key(hash_state_dict(frozen.model.state_dict()), "tok-v1", _token_rows(batch))
    writer = ReferenceLogpCache(tmp_path, key)
    writer.fill(frozen, batch)
    writer.save()
    reader = ReferenceLogpCache(tmp_path, key)
    assert reader.load()
    cached = copy.copy(batch)
    assert reader.attach(cached)

    # Policy dropout must be off for the three policy passes to be comparable.
    policy.eval()
    outs = [dpo(policy, batch, adapter_off), dpo(policy, batch, frozen), dpo(policy, cached, None)]
    losses = [float(o.loss.detach()) for o in outs]
    assert max(losses) - min(losses) < 1e-5, losses
    # Not the trivial policy == reference case (loss log 2, zero rewards).
    assert abs(losses[0] - 0.6931472) > 5e-3, losses
    assert abs(outs[0].metrics["rewards/chosen"]) > 0.1, outs[0].metrics
    assert abs(outs[0].metrics["rewards/margin"]) > 0.01, outs[0].metrics


def test_adapter_disabled_reference_has_no_dropout_and_no_grad():
    policy, frozen = _lora_policy()
    for m in policy.modules():  # switch attention dropout on, so train mode is visibly stochastic
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    batch = make_batch()
    ids, mask = batch.input_ids, batch.attention_mask
    with policy.disable_adapter(), torch.no_grad():
        assert not torch.equal(policy_logits(policy, ids, mask), policy_logits(policy, ids, mask))
    policy.base_model.model.lm_head.eval()  # a submodule deliberately left in eval mode
    ref = AdapterDisabledReference(policy)
    a, b = ref.logits(ids, mask), ref.logits(ids, mask)
    assert torch.equal(a, b)
    assert torch.allclose(a, frozen.logits(ids, mask), atol=1e-6)
    assert policy.training and not policy.base_model.model.lm_head.training  # modes restored exactly
    with pytest.raises(TypeError, match="FrozenCopyReference"):
        AdapterDisabledReference(tiny_lm())


def test_frozen_copy_is_independent_of_later_training():
    model = tiny_lm()
    ref = FrozenCopyReference(model)
    batch = make_batch()
    before = ref.logits(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    assert torch.equal(before, ref.logits(batch.input_ids, batch.attention_mask))
    assert all(not p.requires_grad for p in ref.model.parameters())


def test_reference_logps_hand_computed():
    """Summed response log-probs equal per-row unpadded float64 sums (helpers.row_token_logps)."""
    model, batch = tiny_lm(seed=4), make_batch(seed=1)
    chosen, rejected = reference_logps(FrozenCopyReference(model), batch)
    for i, (p, yc, yr) in enumerate(
        zip(batch.prompt_ids, responses(batch.labels), responses(batch.other_labels))
    ):
        assert chosen[i].item() == pytest.approx(sum(row_token_logps(model, p, yc)), rel=1e-5, abs=1e-5)
        assert rejected[i].item() == pytest.approx(sum(row_token_logps(model, p, yr)), rel=1e-5, abs=1e-5)
    n_c, n_r = response_token_counts(batch)
    assert n_c.tolist() == [len(r) for r in responses(batch.labels)]
    assert n_r.tolist() == [len(r) for r in responses(batch.other_labels)]


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def test_cache_get_put_roundtrip_is_exact(tmp_path):
    cache = ReferenceLogpCache(tmp_path, "k1")
    chosen = torch.tensor([-1.2345678, -20.5], dtype=torch.float32)
    rejected = torch.tensor([-3.3333333, -0.1], dtype=torch.float32)
    cache.put(["a", "b"], torch.tensor([0, 1]), chosen, rejected, torch.tensor([3, 4]), torch.tensor([5, 6]))
    assert cache.get(["a", "b"], ["forward", "reverse"]) is not None
    assert cache.get(["a"], [1]) is None  # (a, reverse) was never stored: direction is part of the key
    assert cache.get(["a", "zzz"], [0, 0]) is None  # any miss -> None
    path = cache.save()
    assert path == tmp_path / "ref_logps-k1.json"
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    again = ReferenceLogpCache(tmp_path, "k1")
    assert again.load() and len(again) == 2
    c, r = again.get(["b", "a"], [1, 0])
    assert torch.equal(c, chosen.flip(0)) and torch.equal(r, rejected.flip(0))
    assert json.loads(path.read_text())["entries"]["forward"]["a"][2:] == [3, 5]


def test_cache_save_is_atomic(tmp_path, monkeypatch):
    cache = ReferenceLogpCache(tmp_path, "k")
    cache.put(["a"], [0], torch.tensor([-1.0]), torch.tensor([-2.0]))
    cache.save()
    cache.put(["b"], [0], torch.tensor([-3.0]), torch.tensor([-4.0]))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.save()
    monkeypatch.undo()
    # The old file is intact, and no temp file is left behind.
    old = ReferenceLogpCache(tmp_path, "k")
    assert old.load() and len(old) == 1
    assert sorted(os.listdir(tmp_path)) == ["ref_logps-k.json"]


def test_cache_load_rejects_a_foreign_key_and_missing_file(tmp_path):
    assert ReferenceLogpCache(tmp_path, "nothing").load() is False
    ReferenceLogpCache(tmp_path, "a").save()
    os.replace(tmp_path / "ref_logps-a.json", tmp_path / "ref_logps-b.json")
    with pytest.raises(ValueError, match="expected version 1 / key 'b'"):
        ReferenceLogpCache(tmp_path, "b").load()
    with pytest.raises(ValueError, match="file-name-safe"):
        ReferenceLogpCache(tmp_path, "../x")


def test_cache_key_and_state_dict_hash():
    model = tiny_lm()
    sd = model.state_dict()
    h = hash_state_dict(sd)
    assert h == hash_state_dict(dict(reversed(list(sd.items()))))  # key order does not matter
    assert h == hash_state_dict(tiny_lm().state_dict())  # same seed, same weights
    changed = {k: v.clone() for k, v in sd.items()}
    first = next(iter(changed))
    changed[first].view(-1)[0] += 1e-6
    assert hash_state_dict(changed) != h
    assert hash_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()}) != h  # dtype is identity
    rows = [_row("i1", 0), _row("i1", 1), _row("i2", 0)]
    k = cache_key(h, "tok", rows)
    named = [_row("i2", "forward"), _row("i1", "reverse"), _row("i1", "forward")]
    assert k == cache_key(h, "tok", named)  # row order and direction spelling do not matter
    assert k != cache_key(h, "tok2", rows)
    assert k != cache_key("other", "tok", rows)
    assert k != cache_key(h, "tok", rows[:2])
    for column in ("prompt_ids", "response_ids", "other_ids"):  # one token more anywhere: another key
        edited = [dict(rows[0], **{column: [*rows[0][column], 7]}), *rows[1:]]
        assert k != cache_key(h, "tok", edited), column
    with pytest.raises(ValueError, match="valid: forward, reverse"):
        cache_key(h, "tok", [_row("i1", "sideways")])


def _model_dir(path, weights: bytes):
    path.mkdir()
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text('{"hidden_size": 8}')
    return path


def test_files_identity_remembers_digests_but_any_edit_of_the_bytes_changes_it(tmp_path, monkeypatch):
    import revmix.objectives.reference as ref

    monkeypatch.setattr(ref, "MEMO_SETTLE_NS", 200_000_000)  # 0.2 s instead of 2 s: a short test
    weights = bytes(range(256)) * 16384  # 4 MiB: a middle byte lies outside the first and last MiB
    model, memo = _model_dir(tmp_path / "m", weights), tmp_path / "memo"
    time.sleep(0.3)  # past the settle time: the digests are remembered
    plain = files_identity(model)
    assert files_identity(model, memo) == plain and len(list(memo.iterdir())) == 2
    # the memo is what a second call reads: a forged entry shows through
    weights_entry = next(p for p in memo.iterdir() if p.read_text() == hashlib.sha256(weights).hexdigest())
    weights_entry.write_text("f" * 64)
    assert files_identity(model, memo) != plain
    # one byte in the middle edited in place, size and mtime put back: ctime moved, so hashed again
    st = os.stat(model / "model.safetensors")
    edited = bytearray(weights)
    edited[len(weights) // 2] ^= 1
    (model / "model.safetensors").write_bytes(bytes(edited))
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = files_identity(model, memo)
    assert changed == files_identity(model) != plain
    # a file changed less than the settle time ago is hashed, not remembered
    assert len(list(memo.iterdir())) == 2


def _row(item_id: str, direction: int | str) -> dict:
    return {
        "item_id": item_id,
        "direction": direction,
        "prompt_ids": [1, 2],
        "response_ids": [3],
        "other_ids": [4],
    }


def _token_rows(batch) -> list[dict]:
    """The tokenised content of a batch's rows, as the cache key takes it."""
    return [
        {
            "item_id": batch.item_id[i],
            "direction": int(batch.direction[i]),
            "prompt_ids": batch.input_ids[i][batch.attention_mask[i].bool()].tolist(),
            "response_ids": [],
            "other_ids": [],
        }
        for i in range(batch.size)
    ]
