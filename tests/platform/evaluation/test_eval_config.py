"""``eval.*`` sampling and engine settings: defaults, ranges and the errors that name the path."""

from __future__ import annotations

import pytest

from revmix.config import build_config
from revmix.validation import ConfigError

ONE_STEP = {"stages": [{"steps": 1}]}


def test_defaults_and_the_k_of_pass_at_k() -> None:
    ev = build_config(ONE_STEP).eval
    assert (ev.generator, ev.samples, ev.temperature, ev.ks()) == ("auto", 1, 0.0, [])
    assert ev.engine_kwargs.kwargs() == {}
    ev = build_config({**ONE_STEP, "eval": {"samples": 8, "temperature": 0.6}}).eval
    assert ev.ks() == [1, 8]
    ev = build_config(ONE_STEP, ["eval.samples=8", "eval.temperature=0.6", "eval.pass_k=[4,2,4]"]).eval
    assert ev.ks() == [2, 4]
    ev = build_config(
        ONE_STEP, ["eval.engine_kwargs.tensor_parallel_size=2", "eval.max_new_tokens=32768"]
    ).eval
    assert ev.engine_kwargs.kwargs() == {"tensor_parallel_size": 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.samples=4"], "eval.samples is 4 but eval.temperature is 0"),
        (
            ["eval.samples=2", "eval.temperature=1", "eval.pass_k=[3]"],
            r"eval.pass_k: \[3\] outside 1..eval.samples \(2\)",
        ),
        (["eval.max_new_tokens=32769"], r"eval.max_new_tokens: expected an integer in \[1, 32768\]"),
        (["eval.generator=vlm"], "eval.generator"),
        (["eval.engine_kwargs.tensor_parallel=2"], "valid keys: tensor_parallel_size, max_model_len"),
        (["eval.engine_kwargs.gpu_memory_utilization=1.2"], "eval.engine_kwargs.gpu_memory_utilization"),
    ],
)
def test_bad_settings_fail_naming_the_path(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(ONE_STEP, overrides)
