"""Tests for revmix.platform.models: local tokenizer, cached tiny Qwen2 models, loading, LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
from transformers import Qwen2ForCausalLM

from revmix.platform import models as M

CHATML_ONE_TURN = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return M.build_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return M.tiny_model_dir("tiny", seed=0, cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture()
def base_model(tiny_dir):
    return M.load_model(str(tiny_dir))


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "What is 12345 + 678? The answer is 13023.",
        "  leading spaces, tabs\tand\nnew\n\nlines  ",
        "Unicode: café, naïve, ½, Ω, 日本語, emoji 🎉",
        "x^2 - 3x + 2 = 0 => x = 1 or x = 2; \\boxed{2}",
    ],
)
def test_tokenizer_round_trips_text(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    pieces = tok.tokenize("In 2024, 1234567890 + 7 = 1234567897.")
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("2024") + list("1234567890") + ["7"] + list("1234567897")
    assert len({tok.convert_tokens_to_ids(d) for d in "0123456789"}) == 10


def test_special_tokens(tok):
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok("<|im_start|>a<|im_end|>")["input_ids"][::2] == [1, 2]  # never split into bytes
    assert len(tok) == 512


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == CHATML_ONE_TURN
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "5"},
    ]
    assert tok.apply_chat_template(multi, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)[
        "input_ids"
    ]  # transformers 5: a BatchEncoding
    assert ids == tok(CHATML_ONE_TURN)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1


def test_tokenizer_build_is_deterministic_and_fast(tok):
    M._trained_tokenizer_json.cache_clear()
    t0 = time.perf_counter()
    again = M.build_tokenizer()
    elapsed = time.perf_counter() - t0
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert elapsed < 2.0, f"tokenizer build took {elapsed:.2f}s"


def test_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least 259"):
        M.build_tokenizer(100)


# ------------------------------------------------------------------------------------------------ model dirs


def test_model_dir_loads_through_public_path(tiny_dir, tok):
    assert sorted(os.listdir(tiny_dir)) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "revmix_build.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    loaded_tok = M.load_tokenizer(str(tiny_dir))
    # AutoTokenizer rebuilds Qwen2 tokenizers around vocab+merges; ours must survive that unchanged.
    assert loaded_tok.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert loaded_tok.chat_template == tok.chat_template
    assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id) == (0, 2)
    assert M.load_tokenizer(str(tiny_dir), padding_side="left").padding_side == "left"

    model = M.load_model(str(tiny_dir))
    assert isinstance(model, Qwen2ForCausalLM)
    cfg = model.config
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size) == (512, 512, 128)
    assert (
        cfg.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    assert model.generation_config.eos_token_id == [2, 0]
    assert model.generation_config.pad_token_id == 0
    logits = model(_ids(loaded_tok, CHATML_ONE_TURN)).logits
    assert logits.shape == (1, len(loaded_tok(CHATML_ONE_TURN)["input_ids"]), 512)
    assert torch.isfinite(logits).all()
    info = json.loads((tiny_dir / "revmix_build.json").read_text())
    assert (info["scale"], info["seed"], info["parameters"]) == ("tiny", 0, 1_050_752)


def test_model_dir_is_cached(tmp_path, monkeypatch):
    first = M.tiny_model_dir("tiny", seed=3, cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(M, "_build_into", boom)
    second = M.tiny_model_dir("tiny", seed=3, cache_dir=tmp_path)
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind
    assert first.stat().st_mode & 0o777 == 0o755  # readable by other users of a shared cache


def test_seeded_init_is_reproducible_and_rng_neutral(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = M.tiny_model_dir("tiny", seed=1, cache_dir=tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    b = M.tiny_model_dir("tiny", seed=1, cache_dir=tmp_path / "b")
    c = M.tiny_model_dir("tiny", seed=2, cache_dir=tmp_path / "a")
    assert a.name == b.name and a.name != c.name
    wa, wb, wc = (safetensors.torch.load_file(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_build_race_loser_uses_winner(tmp_path, monkeypatch):
    """Another builder renames its dir into place while we build: we keep theirs and clean up ours."""
    winner = M.tiny_model_dir("tiny", seed=0, cache_dir=tmp_path / "winner")
    original = M._build_into
    target = tmp_path / "race" / winner.name

    def build_then_lose(out_dir, *args):
        original(out_dir, *args)
        shutil.copytree(winner, target)

    monkeypatch.setattr(M, "_build_into", build_then_lose)
    assert M.tiny_model_dir("tiny", seed=0, cache_dir=tmp_path / "race") == target
    assert [p.name for p in (tmp_path / "race").iterdir()] == [target.name]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(out_dir, *args):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(M, "_build_into", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        M.tiny_model_dir("tiny", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builders_both_succeed(tmp_path):
    code = (
        "import sys; from revmix.platform.models import tiny_model_dir; "
        "print(tiny_model_dir('tiny', seed=5, cache_dir=sys.argv[1]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
    paths = {out.decode().strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1  # same tokenizer hash in both processes → same cache key
    (path,) = paths
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]
    assert M.load_model(path).config.hidden_size == 128


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("REVMIX_CACHE", str(tmp_path))
    tiny = M.resolve_model_path(None)
    assert Path(tiny).parent == tmp_path / "models" and "qwen2-tiny-seed0-" in tiny
    assert M.resolve_model_path(None, scale="tiny", seed=4) != tiny
    small = M.resolve_model_path("tiny:small")
    assert json.loads((Path(small) / "config.json").read_text())["hidden_size"] == 256
    assert M.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert M.resolve_model_path("/some/dir") == "/some/dir"
    with pytest.raises(ValueError, match=r"unknown tiny scale 'huge'.*tiny:base"):
        M.resolve_model_path("tiny:huge")
    with pytest.raises(ValueError, match="valid scales"):
        M.tiny_model_dir("huge", cache_dir=tmp_path)


@pytest.mark.parametrize(
    "scale,expected,lo,hi",
    [("tiny", 1_050_752, 0.8e6, 1.3e6), ("small", 6_035_712, 5e6, 7e6), ("base", 30_163_456, 25e6, 35e6)],
)
def test_scale_parameter_counts(tok, scale, expected, lo, hi):
    with torch.device("meta"):
        model = Qwen2ForCausalLM(M._qwen2_config(scale, tok))
    trainable, total = M.count_parameters(model)
    assert trainable == total == expected
    assert lo <= total <= hi
    assert f"{expected:,}" in Path(M.__file__).read_text()  # the documented table stays true


def test_load_model_dtypes(tiny_dir):
    assert M.load_model(str(tiny_dir), dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*float32"):
        M.load_model(str(tiny_dir), dtype="fp8")


# ------------------------------------------------------------------------------------------------ LoRA


def _perturb_lora(model: peft.PeftModel) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_trains_adapter_only(base_model):
    lora = M.apply_lora(base_model, M.LoraSpec(r=8))
    trainable, total = M.count_parameters(lora)
    # per layer: q 8*(128+128) + k 8*(128+64) + v 8*(128+64) + o 8*(128+128) = 7168; 4 layers
    assert trainable == 4 * 7168 == 28_672
    assert total == 1_050_752 + trainable
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_lora_init_leaves_logits_unchanged(base_model, tok):
    ids = _ids(tok, CHATML_ONE_TURN + "The answer is 5.")
    with torch.no_grad():
        before = base_model(ids).logits.clone()
        after = M.apply_lora(base_model, M.LoraSpec()).eval()(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_merge_lora_matches_peft_logits(base_model, tok):
    ids = _ids(tok, CHATML_ONE_TURN + "The answer is 5.")
    with torch.no_grad():
        base = base_model(ids).logits.clone()
        lora = M.apply_lora(base_model, M.LoraSpec(r=4, alpha=8))
        _perturb_lora(lora)
        with_adapter = lora(ids).logits.clone()
        merged = M.merge_lora(lora)
        assert not isinstance(merged, peft.PeftModel)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, with_adapter, atol=1e-5, rtol=1e-5)
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter really changed the model
    assert M.merge_lora(merged) is merged


def test_apply_lora_rejects_unknown_targets(base_model):
    with pytest.raises(ValueError, match=r"\['qkv'\] not in the model's linear layers.*gate_proj"):
        M.apply_lora(base_model, M.LoraSpec(target_modules=("q_proj", "qkv")))
    with pytest.raises(ValueError, match="r must be > 0"):
        M.LoraSpec(r=0)


def test_trainable_state_dict_lora_round_trip(base_model, tmp_path):
    lora = M.apply_lora(base_model, M.LoraSpec())
    _perturb_lora(lora)
    state = M.trainable_state_dict(lora)
    assert len(state) == 4 * 4 * 2 and all("lora_" in k for k in state)
    safetensors.torch.save_file(state, tmp_path / "adapter.safetensors")
    saved = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.zero_()
    M.load_trainable_state_dict(lora, safetensors.torch.load_file(tmp_path / "adapter.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in M.trainable_state_dict(lora).items())


def test_trainable_state_dict_full_round_trip(base_model, tmp_path):
    state = M.trainable_state_dict(base_model)
    assert "lm_head.weight" not in state  # tied to embed_tokens: stored once
    assert sum(v.numel() for v in state.values()) == 1_050_752
    safetensors.torch.save_file(state, tmp_path / "full.safetensors")  # no shared-tensor error
    emb = base_model.model.embed_tokens.weight
    before = emb.detach().clone()
    with torch.no_grad():
        emb.add_(1.0)
    M.load_trainable_state_dict(base_model, {k: v - (1.0 if "embed" in k else 0.0) for k, v in state.items()})
    torch.testing.assert_close(emb.detach(), before)
    with pytest.raises(KeyError, match="missing trainable"):
        M.load_trainable_state_dict(base_model, {})


def test_save_model_merges_without_mutating(base_model, tok, tmp_path):
    ids = _ids(tok, CHATML_ONE_TURN)
    lora = M.apply_lora(base_model, M.LoraSpec())
    _perturb_lora(lora)
    with torch.no_grad():
        expected = lora(ids).logits.clone()
    M.save_model(lora, tok, tmp_path / "out")
    assert isinstance(lora, peft.PeftModel) and M.count_parameters(lora)[0] == 28_672  # adapter intact
    reloaded = M.load_model(str(tmp_path / "out"))
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (
        M.load_tokenizer(str(tmp_path / "out")).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    )
