"""SamplingParams validation, prompt helpers, model-dir resolution and the generator registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from revmix.platform.generation import protocol
from revmix.platform.generation.protocol import (
    Generator,
    SamplingParams,
    chat_prompt,
    make_generator,
    prepare_prompts,
    resolve_kind,
    resolve_model_dir,
    truncate_at_stop,
)
from revmix.platform.models import build_tokenizer


def test_sampling_params_defaults_and_validation() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.stop, p.seed, p.n) == (256, 0.0, 1.0, (), 0, 1)
    assert p.greedy and not p.replace(temperature=0.7).greedy
    assert SamplingParams(stop="###").stop == ("###",)  # a lone string becomes a 1-tuple
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    for bad, match in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n must"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop=("",)), "stop"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


def test_truncate_at_stop_uses_earliest_match() -> None:
    assert truncate_at_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)
    assert truncate_at_stop("abc", ("x",)) == ("abc", False)
    assert truncate_at_stop("abc", ()) == ("abc", False)
    assert truncate_at_stop("xabc", ("x",)) == ("", True)


def test_chat_prompt_and_prepare_prompts() -> None:
    tok = build_tokenizer()
    assert chat_prompt(tok, "2+2?") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tok, "q", system="be brief").startswith("<|im_start|>system\nbe brief<|im_end|>\n")

    class Raw:
        tokenizer = tok

    class Chat:
        chat = True

    assert prepare_prompts(Raw(), ["q"]) == [chat_prompt(tok, "q")]
    assert prepare_prompts(Chat(), ["q"]) == ["q"]
    with pytest.raises(ValueError, match="no .tokenizer"):
        prepare_prompts(object(), ["q"])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat_prompt(tok, "q")


def test_resolve_model_dir(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert resolve_model_dir(model) == str(model)
    assert resolve_model_dir(run) == str(run / "model")
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(FileNotFoundError, match="run directory"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "missing")


def test_registry_kinds_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="valid kinds: hf, vllm, openai, auto"):
        resolve_kind("tgi")
    assert resolve_kind("hf") == "hf"
    monkeypatch.setattr(protocol, "vllm_usable", lambda: False)
    assert resolve_kind("auto") == "hf"
    monkeypatch.setattr(protocol, "vllm_usable", lambda: True)
    assert resolve_kind("auto") == "vllm"
    if importlib.util.find_spec("vllm") is None:
        monkeypatch.undo()
        assert protocol.vllm_usable() is False
    with pytest.raises(ValueError, match="needs model="):
        make_generator("hf")


def test_make_generator_builds_backends() -> None:
    from revmix.platform.generation.hf import HFGenerator
    from revmix.platform.generation.openai_backend import OpenAIGenerator
    from tests.platform.generation.helpers import tiny_dir

    hf = make_generator("hf", tiny_dir(), batch_size=2)
    assert isinstance(hf, HFGenerator) and hf.batch_size == 2
    assert isinstance(hf, Generator)
    oa = make_generator("openai", "m", base_url="http://127.0.0.1:9/v1")
    assert isinstance(oa, OpenAIGenerator) and oa.model == "m"
    assert isinstance(oa, Generator)
