"""The pure parts of ``benchmarks/gpu_scale.py`` (GPU only to run): published parameter counts, the MFU
arithmetic on hand-computed numbers, the GPU peak lookup, and its clear exit without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_scale.py"


@pytest.fixture(scope="module")
def gs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("arch", "published"),
    [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304), ("qwen2.5-7b", 7_615_616_512)],
)
def test_parameter_count_matches_the_published_models(gs: ModuleType, arch: str, published: int) -> None:
    values = gs.config_values(arch, 16_384)
    assert gs.parameter_count(values)["total"] == published
    with torch.device("meta"):  # the real module tree, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**values))
    assert sum(p.numel() for p in model.parameters()) == published


def test_step_flops_by_hand(gs: ModuleType) -> None:
    # h=4, 2 heads of 2, 1 kv head (kv dim 2), inter 8, 1 layer, vocab 10, tied:
    # attention 16+4 + 2*(8+2) + 16 = 56; layer 56 + 3*32 + 8 = 160; body 160 + 4 = 164; embedding 40
    values = {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 8, "vocab_size": 10, "tie_word_embeddings": True}  # fmt: skip
    assert gs.parameter_count(values) == {"total": 204, "non_embedding": 164, "lm_head": 40}
    # N = 164 + the tied lm_head's 40 = 204: 6*204*3 + 12*1*4*3*3 = 3672 + 432
    assert gs.step_flops(values, tokens=3, seq_len=3) == 4104
    assert gs.step_flops(values, tokens=3, seq_len=3, weight_factor=4) == 4 * 204 * 3 + 432
    untied = {**values, "tie_word_embeddings": False}
    assert gs.parameter_count(untied) == {"total": 244, "non_embedding": 204, "lm_head": 40}
    assert gs.step_flops(untied, tokens=3, seq_len=3) == 4104


def test_mfu_and_peak_lookup(gs: ModuleType) -> None:
    assert gs.mfu(989.5e12, 2.0, 989.5) == pytest.approx(0.5, rel=1e-12)
    assert gs.peak_tflops_of("NVIDIA H200", None) == 989.5
    assert gs.peak_tflops_of("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gs.peak_tflops_of("Some GPU", 100.0) == 100.0
    with pytest.raises(ValueError, match="--peak-tflops"):
        gs.peak_tflops_of("Some GPU", None)
    with pytest.raises(ValueError, match="must be positive"):
        gs.mfu(1.0, 0.0, 989.5)
    with pytest.raises(ValueError, match="valid: qwen2.5-0.5b"):
        gs.config_values("qwen2.5-3b", 1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_exits_with_a_clear_message_without_cuda(
    gs: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["gpu_scale.py", "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gs.main()
    assert not (tmp_path / "out.json").exists()
