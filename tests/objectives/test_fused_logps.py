"""Fused response log-probs (``runtime.logp_kernel: cce``, :func:`revmix.objectives.base.fused_token_logps`):
equal to the chunked computation in values and gradients — with respect to the hidden states, the output
layer's weight and every trainable parameter — with padding, ``-100`` labels and a temperature, through
length groups, packing, LoRA and the objectives that use it; and the kernel choice, its announcement and
its refusals.

On CPU the fused path runs Cut Cross-Entropy's ``torch_compile`` implementation (its Triton kernel needs
CUDA: ``test_cuda_kernel_*``, marked ``gpu``); both compute the log-softmax in float32 whatever the input
dtype, so float64 models are compared with float32 tolerances scaled by the values."""

from __future__ import annotations

import dataclasses
import functools
import sys
import types

import pytest
import torch

from revmix.objectives import base
from revmix.objectives.base import (
    IGNORE_INDEX,
    Batch,
    PolicyForward,
    build_objective,
    forward_token_logps,
    fused_target_logps,
    fused_token_logps,
    output_layer_problem,
    output_weight,
    policy_hidden,
    target_logps,
    token_logps,
)
from revmix.objectives.buckets import LengthBucketedLM
from revmix.objectives.fixtures import FrozenCopy, make_batch
from revmix.objectives.packing import response_logps
from revmix.platform import models as M
from revmix.platform.recipe import policy_forward

REL = 2e-5  # float32 log-softmax: ~1e-7 per element, sums over the vocabulary and the rows add a little


@functools.cache
def _cpu_kernel_missing() -> str:
    """Why the fused path cannot run here ("" when it can): the package, or torch.compile on CPU (inductor
    compiles C++: it needs a working compiler)."""
    ok, why = base.fused_available("torch_compile")
    if not ok:
        return f"{why}; install it with pip install --no-deps cut-cross-entropy (the gpu extra)"
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as e:  # no C++ compiler, an inductor that cannot build here
        return f"torch.compile cannot run on this CPU ({type(e).__name__}: {str(e)[:200]})"
    return ""


needs_kernel = pytest.mark.skipif(bool(_cpu_kernel_missing()), reason=_cpu_kernel_missing() or "runs")


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL, what: str = "") -> None:
    scale = max(1.0, float(want.detach().abs().max()))
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.0e} × {scale:.3g}"


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return M.resolve_model_path(None, "tiny")  # 4 layers, hidden 128, vocabulary 512, tied embeddings


def _model(path: str, lora: bool = False) -> torch.nn.Module:
    model = M.load_model(path).double()
    if lora:
        torch.manual_seed(0)
        model = M.apply_lora(model, M.LoraSpec(r=4, alpha=8))
        with torch.no_grad():  # B starts at 0: move it so the adapter changes the hidden states
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return model


def _rows(seed: int = 0, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of 11, 7 and 9 tokens: prompts of 3, 2 and 4, the rest response (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [11, 7, 9], [3, 2, 4]
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
        ids[i, n:] = 0
    return ids, mask, labels


@needs_kernel
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_fused_equals_chunked_in_values_and_gradients_of_hidden_states_and_weight(tiny_path, tau):
    """The kernel alone: one set of final hidden states and the lm_head weight, scored both ways."""
    model = _model(tiny_path)
    ids, mask, labels = _rows()
    with torch.no_grad():
        hidden = policy_hidden(model, ids, mask)
        assert torch.equal(model.lm_head(hidden), model(input_ids=ids, attention_mask=mask).logits)
    weight = output_weight(model).detach()
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # d loss / d logp

    h1, W1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, got_mask = fused_token_logps(h1, W1, labels, tau)
    (w * logp).sum().backward()
    h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want, want_mask = token_logps(h2 @ W2.T, labels, tau)
    (w * want).sum().backward()

    assert torch.equal(got_mask, want_mask) and got_mask.sum() == 8 + 5 + 5
    assert logp.dtype == torch.float32 and logp.shape == (3, 10)
    assert float(logp[~got_mask].abs().max()) == 0.0  # off the response: 0, as token_logps gives
    _close(logp, want, what="log-probs")
    _close(h1.grad, h2.grad, what="d/d hidden")
    _close(W1.grad, W2.grad, what="d/d weight")
    assert float(h2.grad.abs().max()) > 0 and float(W2.grad.abs().max()) > 0

    # Unshifted, as DPO's shared-prompt rows use it: position t scored against targets[:, t], t < L.
    targets = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(2))
    _close(fused_target_logps(hidden, weight, targets, tau), target_logps(hidden @ weight.T, targets, tau))


@needs_kernel
@pytest.mark.parametrize("wrap", ["plain", "lora", "length_groups", "packed"])
def test_fused_forward_equals_chunked_through_the_model_and_its_wrappers(tiny_path, wrap):
    """Full fine-tuning (the tied embedding gets its gradient from both ends), LoRA, the length-grouped
    wrapper (hidden states computed per group) and packed rows: same log-probs, same parameter gradients."""
    model = _model(tiny_path, lora=wrap == "lora")
    ids, mask, labels = _rows(3)
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    runs = []
    for kernel in ("chunked", "cce"):
        if wrap == "packed":
            logp, resp = response_logps(model, ids, mask, labels, "mask", kernel)
        else:
            lm = LengthBucketedLM(model, 3) if wrap == "length_groups" else model
            logp, resp = forward_token_logps(lm, ids, mask, labels, kernel)
        grads = torch.autograd.grad((w * logp).sum(), params)
        runs.append((logp, resp, grads))
    (want, want_mask, want_grads), (got, got_mask, got_grads) = runs
    assert torch.equal(got_mask, want_mask)
    _close(got, want, what="log-probs")
    assert len(got_grads) == len(params) > 0
    for i, (g, ref) in enumerate(zip(got_grads, want_grads)):
        _close(g, ref, what=f"gradient {i}")


@needs_kernel
def test_fused_forward_through_ddp_equals_chunked(tiny_path):
    """The training loop's multi-worker wrapping, DDP around the length groups (one gloo process on
    127.0.0.1): the hidden-state request passes DDP's forward, the weight is found inside it, and the
    tied embedding's gradient (from the input and the output end) is the chunked one."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model(tiny_path)
        ddp = DistributedDataParallel(LengthBucketedLM(model, 2))
        ids, mask, labels = _rows(6)
        w = torch.randn(3, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        runs = []
        for kernel in ("chunked", "cce"):
            model.zero_grad(set_to_none=True)
            logp, _ = forward_token_logps(ddp, ids, mask, labels, kernel)
            (w * logp).sum().backward()
            runs.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()
    (want, want_grads), (got, got_grads) = runs
    _close(got, want, what="log-probs")
    assert len(got_grads) == len(want_grads) == len(list(model.parameters()))
    for i, (g, ref) in enumerate(zip(got_grads, want_grads)):
        _close(g, ref, what=f"gradient {i}")


def _objective_run(model: torch.nn.Module, spec: dict, batch: Batch, ref: object) -> tuple[float, dict, list]:
    obj = build_objective(spec)
    model.zero_grad(set_to_none=True)
    out = obj(model, batch, ref)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return float(out.loss.detach()), out.metrics, grads


@needs_kernel
@pytest.mark.parametrize(
    ("spec", "forward"),
    [
        ({"name": "sft"}, {}),
        ({"name": "sft"}, {"packing": "mask"}),
        ({"name": "dpo", "entropy_metrics": False}, {"shared_prompt": True, "length_groups": 2}),
        ({"name": "dpo", "entropy_metrics": False, "shared_prompt": False}, {}),
        ({"name": "simpo", "entropy_metrics": False}, {"shared_prompt": True}),
        ({"name": "kto"}, {}),
        ({"name": "unlikelihood", "entropy_metrics": False}, {}),
    ],
    ids=["sft", "sft-packed", "dpo-shared-prompt", "dpo-concatenated", "simpo", "kto", "unlikelihood"],
)
def test_objectives_on_the_fused_kernel_equal_the_chunked_ones(spec, forward):
    """What the training loop hands over (``PolicyForward.logp_kernel``) changes no loss, metric or
    gradient of the objectives that use it (a random LoRA model and batch from the objective fixtures)."""
    model = _model(M.resolve_model_path(None, "tiny"), lora=True)
    batch = make_batch(seed=5, batch_size=4)
    ref = FrozenCopy(
        _model(M.resolve_model_path(None, "tiny")), shared_prompt=True
    )  # no adapter: rewards ≠ 0
    runs = []
    for kernel in ("chunked", "cce"):
        b = dataclasses.replace(batch, policy_forward=PolicyForward(**forward, logp_kernel=kernel))
        runs.append(_objective_run(model, spec, b, ref))
    (want, want_metrics, want_grads), (got, got_metrics, got_grads) = runs
    assert got == pytest.approx(want, rel=REL, abs=REL)
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    assert len(got_grads) == len(want_grads) == len([p for p in model.parameters() if p.requires_grad])
    for g, ref_g in zip(got_grads, want_grads):
        _close(g, ref_g)


@needs_kernel
def test_training_loop_announces_the_kernel_and_trains_the_same(tmp_path, capsys, monkeypatch):
    """``revmix train``'s in-process loop (no Ray): the stage setup resolves ``runtime.logp_kernel``, says
    which kernel and why in one line, and hands it to the objective; the per-step losses are the chunked
    run's (SFT, full fine-tuning, two length groups)."""
    import json
    from pathlib import Path

    from revmix.config import load_config
    from revmix.platform.train import run_experiment

    sft = Path(__file__).resolve().parents[2] / "configs" / "runs" / "sft_tiny.yaml"
    # A random base: losses near 5 nats, where a relative tolerance reads the kernels' agreement (a
    # pretrained base's second-step loss is 0.002, all rounding).
    short = [
        "data.n_items=24",
        "model.base=random",
        "model.lora.enabled=false",
        "stages.0.batch_size=4",
        "stages.0.steps=2",
    ]
    fused_calls = []
    real = base._fused_nll
    monkeypatch.setattr(base, "_fused_nll", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    losses, lines, calls = {}, {}, {}
    for kernel in ("auto", "cce"):
        run = tmp_path / kernel
        run_experiment(load_config(sft, [*short, f"runtime.logp_kernel={kernel}"]), run, evaluate=False)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses[kernel] = [r["loss"] for r in recs]
        lines[kernel] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("log-probs:")]
        calls[kernel] = len(fused_calls)
    assert lines["auto"] == [
        "log-probs: chunked (auto: not on a CUDA device (Cut Cross-Entropy's kernel needs one))"
    ]
    assert lines["cce"] == [
        "log-probs: cce (set by runtime.logp_kernel; off CUDA its torch_compile implementation computes the "
        "logits); entropy, label smoothing, PPO and the reference stay chunked"
    ]
    assert calls == {"auto": 0, "cce": 2}  # one fused call per step (one micro-batch each)
    assert len(losses["cce"]) == 2 and losses["cce"] == pytest.approx(losses["auto"], rel=REL)


def test_statistics_of_the_whole_distribution_stay_chunked(monkeypatch):
    """Entropy metrics and label smoothing need the logits: with the fused kernel chosen they are still
    computed (chunked), and the fused function is never called for them."""
    calls = []
    monkeypatch.setattr(base, "_fused_nll", lambda *a, **k: calls.append(1))
    from revmix.objectives.fixtures import tiny_lm

    model = tiny_lm()
    batch = make_batch(seed=1)
    batch.policy_forward = PolicyForward(shared_prompt=True, logp_kernel="cce")
    out = build_objective({"name": "dpo"})(model, batch, FrozenCopy(model, shared_prompt=True))
    assert "entropy/chosen" in out.metrics
    out = build_objective({"name": "sft", "label_smoothing": 0.1})(model, batch)
    assert out.metrics["tokens"] > 0 and not calls


def test_output_layer_the_fused_kernel_cannot_read_is_refused_by_name(tiny_path):
    model = M.load_model(tiny_path)
    assert output_layer_problem(model) == ""
    assert output_layer_problem(LengthBucketedLM(M.apply_lora(model, M.LoraSpec()), 2)) == ""
    adapted = M.apply_lora(M.load_model(tiny_path), M.LoraSpec(target_modules=("q_proj", "lm_head")))
    problem = output_layer_problem(adapted)
    assert "not a plain nn.Linear (an adapter on lm_head?)" in problem
    with pytest.raises(
        ValueError, match=r"runtime.logp_kernel=cce\): the output layer is a .*logp_kernel=chunked"
    ):
        output_weight(adapted)
    kind, why = M.choose_logp_kernel("auto", "cuda", model=adapted)
    assert kind == "chunked" and why.startswith("auto: on CUDA but ")


@pytest.fixture
def no_cce_package(monkeypatch):
    """``import cut_cross_entropy`` raises ImportError, as on a machine without the gpu extra."""
    base._linear_cross_entropy.cache_clear()
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    yield
    base._linear_cross_entropy.cache_clear()


def test_kernel_choice_auto_chunked_and_the_reasons(no_cce_package):
    assert M.choose_logp_kernel("auto", "cpu") == (
        "chunked",
        "auto: not on a CUDA device (Cut Cross-Entropy's kernel needs one)",
    )
    assert M.choose_logp_kernel("chunked", "cuda") == ("chunked", "set by runtime.logp_kernel")
    kind, why = M.choose_logp_kernel("auto", "cuda")
    assert (
        kind == "chunked"
        and "auto: on CUDA but cut_cross_entropy does not import (ModuleNotFoundError" in why
    )
    with pytest.raises(ValueError, match=r"does not import .*pip install 'revmix\[gpu\]'.*auto or chunked"):
        M.choose_logp_kernel("cce", "cuda")
    with pytest.raises(ValueError, match="unknown logp_kernel 'fused'; valid: auto, chunked, cce"):
        M.choose_logp_kernel("fused", "cpu")


def test_kernel_choice_with_the_package(monkeypatch):
    """With a ``cut_cross_entropy`` that imports (a stand-in module: the Triton kernel needs CUDA), auto
    picks cce on CUDA only; fsdp keeps chunked; the loop's PolicyForward carries the choice."""
    base._linear_cross_entropy.cache_clear()
    fake = types.ModuleType("cut_cross_entropy")
    fake.linear_cross_entropy = lambda *a, **k: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", fake)
    try:
        assert M.choose_logp_kernel("auto", "cuda") == ("cce", "auto: on CUDA and cut_cross_entropy imports")
        assert M.choose_logp_kernel("cce", "cuda") == ("cce", "set by runtime.logp_kernel")
        assert M.choose_logp_kernel("auto", "cpu")[0] == "chunked"
        kind, why = M.choose_logp_kernel("auto", "cuda", strategy="fsdp")
        assert kind == "chunked" and "runtime.strategy=fsdp shards the lm_head weight" in why
        with pytest.raises(ValueError, match="runtime.logp_kernel=cce: runtime.strategy=fsdp shards"):
            M.choose_logp_kernel("cce", "cuda", strategy="fsdp")
    finally:
        base._linear_cross_entropy.cache_clear()
    from revmix.objectives.fixtures import tiny_lm

    model = tiny_lm()
    assert policy_forward(model, 2, 1, logp_kernel="cce").logp_kernel == "cce"
    assert policy_forward(model, 2, 1).logp_kernel == "chunked"
    with pytest.raises(ValueError, match="valid: chunked, cce"):
        policy_forward(model, 2, 1, logp_kernel="auto")  # resolved before it gets here


@needs_kernel
def test_explicit_cce_on_cpu_runs_the_torch_compile_implementation():
    kind, why = M.choose_logp_kernel("cce", "cpu")
    assert kind == "cce" and "off CUDA its torch_compile implementation computes the logits" in why


# --------------------------------------------------------------------------------------------------
# CUDA: Cut Cross-Entropy's Triton kernel
# --------------------------------------------------------------------------------------------------


def _cuda_kernel_missing() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    ok, why = base.fused_available("cce")
    return "" if ok else f"{why}: install the gpu extra"


@pytest.mark.gpu
@pytest.mark.skipif(bool(_cuda_kernel_missing()), reason=_cuda_kernel_missing() or "runs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_chunked_and_holds_no_logits(dtype):
    """The Triton kernel against the chunked path on the same hidden states and weight: values and
    gradients (bf16: to bf16's resolution), and a peak memory far below the logits it never forms."""
    torch.manual_seed(0)
    vocab, hidden_size, rows, width = 151_936, 896, 4, 2048  # Qwen2.5's vocabulary, 0.5B's width
    hidden = (torch.randn(rows, width, hidden_size, device="cuda") * 0.5).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.05).to(dtype)
    labels = torch.randint(0, vocab, (rows, width), device="cuda")
    labels[:, :100] = IGNORE_INDEX
    g = torch.randn(rows, width - 1, device="cuda")
    results = {}
    for kernel in ("chunked", "cce"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if kernel == "cce":
            logp, mask = fused_token_logps(h, w, labels)
        else:
            logp, mask = token_logps(h @ w.T, labels)
        (g * logp).sum().backward()
        torch.cuda.synchronize()
        results[kernel] = (logp.detach(), mask, h.grad, w.grad, torch.cuda.max_memory_allocated() - start)
    (lp1, m1, hg1, wg1, peak1), (lp2, m2, hg2, wg2, peak2) = results["chunked"], results["cce"]
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.equal(m1, m2)
    _close(lp2, lp1, rel, "log-probs")
    _close(hg2, hg1, rel, "d/d hidden")
    _close(wg2, wg1, rel, "d/d weight")
    logits_bytes = rows * width * vocab * hidden.element_size()
    assert peak2 < logits_bytes / 2 < peak1, (peak2, logits_bytes, peak1)


@pytest.mark.gpu
@pytest.mark.skipif(bool(_cuda_kernel_missing()), reason=_cuda_kernel_missing() or "runs")
def test_cuda_sft_and_dpo_on_the_kernel_equal_chunked(tiny_path):
    """SFT and DPO's policy side through the tiny model on CUDA (float32): same losses and gradients."""
    model = M.apply_lora(M.load_model(tiny_path, device="cuda"), M.LoraSpec(r=4, alpha=8))
    batch = make_batch(seed=5, batch_size=4).to("cuda")
    ref = FrozenCopy(model, shared_prompt=True)
    for spec, forward in (
        ({"name": "sft"}, {}),
        ({"name": "dpo", "entropy_metrics": False}, {"shared_prompt": True}),
    ):
        runs = []
        for kernel in ("chunked", "cce"):
            b = dataclasses.replace(batch, policy_forward=PolicyForward(**forward, logp_kernel=kernel))
            runs.append(_objective_run(model, spec, b, ref))
        (want, _, want_grads), (got, _, got_grads) = runs
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), spec
        for g, ref_g in zip(got_grads, want_grads):
            _close(g, ref_g, 1e-3, spec["name"])
