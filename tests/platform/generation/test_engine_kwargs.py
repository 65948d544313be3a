"""``--engine-kwargs`` of ``revmix serve`` and ``revmix eval``: checked keys and ranges, loud errors before
anything starts; the sampling flags of ``revmix eval``."""

from __future__ import annotations

import argparse

import pytest

from revmix.cli import main
from revmix.platform.evaluation import cli as eval_cli
from revmix.platform.generation import serve_cli
from revmix.platform.generation.vllm_backend import engine_kwargs_from_json
from tests.platform.generation.helpers import tiny_dir


def test_engine_kwargs_are_checked_against_the_listed_keys() -> None:
    text = '{"tensor_parallel_size": 2, "max_model_len": 8192, "gpu_memory_utilization": 0.85}'
    assert engine_kwargs_from_json(text, "--engine-kwargs") == {
        "tensor_parallel_size": 2,
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.85,
    }
    with pytest.raises(
        ValueError, match=r"--engine-kwargs: .*'tensor_parallel'.*did you mean 'tensor_parallel_size'"
    ):
        engine_kwargs_from_json('{"tensor_parallel": 2}', "--engine-kwargs")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization.*1\.5"):
        engine_kwargs_from_json('{"gpu_memory_utilization": 1.5}', "--engine-kwargs")
    with pytest.raises(ValueError, match="--engine-kwargs: not JSON"):
        engine_kwargs_from_json("{max_model_len: 5}", "--engine-kwargs")
    with pytest.raises(ValueError, match="expected a JSON object"):
        engine_kwargs_from_json("[1]", "--engine-kwargs")


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_refuses_bad_engine_kwargs_and_the_hf_backend(capsys: pytest.CaptureFixture[str]) -> None:
    bad = _serve_args([tiny_dir(), "--backend", "vllm", "--port", "0", "--engine-kwargs", '{"tp": 2}'])
    assert serve_cli.run(bad) == 2
    assert "--engine-kwargs: " in capsys.readouterr().err
    hf = _serve_args(
        [tiny_dir(), "--backend", "hf", "--port", "0", "--engine-kwargs", '{"max_model_len": 64}']
    )
    assert serve_cli.run(hf) == 2
    assert "--engine-kwargs needs --backend vllm (the backend here is hf)" in capsys.readouterr().err


def test_eval_sampling_flags(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", tiny_dir(), "--benchmarks", "synthetic", "--out", str(tmp_path / "o")]
    cases = [
        (["--samples", "4"], "--samples 4 with --temperature 0"),
        (
            ["--samples", "2", "--temperature", "1", "--pass-k", "1,3"],
            "--pass-k: 1,3 has a k outside 1..--samples (2)",
        ),
        (["--max-new-tokens", "40000"], "--max-new-tokens must be in 1..32768"),
        (["--engine-kwargs", '{"max_model_len": 64}'], "--engine-kwargs needs --generator vllm"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the checks
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args([*base[1:], "--samples", "4", "--temperature", "0.7", "--top-p", "0.9"])
    params, ks = eval_cli.sampling_from_args(args)
    assert (params.n, params.temperature, params.top_p, ks) == (4, 0.7, 0.9, [1, 4])


def test_eval_engine_kwargs_reach_the_vllm_generator(tmp_path) -> None:
    from revmix.platform.generation.vllm_backend import VLLMGenerator

    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    argv = ["--model", tiny_dir(), "--benchmarks", "synthetic", "--out", str(tmp_path)]
    argv += ["--generator", "vllm", "--engine-kwargs", '{"max_model_len": 64, "max_num_seqs": 4}']
    gen = eval_cli._with_engine_kwargs(tiny_dir(), parser.parse_args(argv))
    assert isinstance(gen, VLLMGenerator)  # built, not started: vLLM is imported when the engine starts
    assert gen.engine_kwargs["max_model_len"] == 64 and gen.engine_kwargs["max_num_seqs"] == 4
