"""transformers backend: batched, KV-cached generation and one-forward-per-batch scoring.

The embedded CPU default and the engine behind the ``revmix serve`` HF deployment. It also takes an
in-memory model, so the training loop can evaluate the live policy without saving it: generation and
scoring run under ``torch.inference_mode``, in eval mode (restored afterwards), and sampling draws from a
forked RNG so that evaluating never shifts the training run's random stream.

Batching: prompts are sorted by length (less padding), left-padded, and decoded with ``model.generate``
(KV cache on). Scoring left-pads prompt+completion, passes explicit ``position_ids`` (so every row sees the
positions it would see alone) and asks the model for logits of the last ``K+1`` positions only
(``logits_to_keep``), where K is the longest completion in the batch: memory grows with completion length,
not prompt length, which matters for ALP over 1000-token completions of long prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from revmix.objectives.base import target_logps
from revmix.platform.generation.protocol import SamplingParams, resolve_model_dir, truncate_at_stop


@dataclass(frozen=True)
class Completion:
    """One sampled completion: text (stop string and EOS removed), tokens generated (EOS included) and why
    it ended: ``"stop"`` (EOS or a stop string) or ``"length"`` (``max_new_tokens`` reached)."""

    text: str
    n_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()  # the tokens of ``text`` (re-encoded when a stop string cut it)


def _dtype_name(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """``None`` → float32 on CPU (exact parity with vLLM in tests), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype is None:
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On CUDA, keep SDPA off the cuDNN backend: with a padding mask torch picks it, and cuDNN builds an
    attention graph for every new (batch, length) shape — i.e. at every decoding step of every batch.
    Measured on an H100 (6M-parameter model, bf16): 40-150 ms per step instead of ~6 ms. The
    memory-efficient kernel takes masks and has no per-shape set-up."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class HFGenerator:
    """``Generator`` over a transformers causal LM (path, run directory or in-memory model)."""

    chat = False  # prompts are raw, chat-templated text (see protocol.prepare_prompts)

    def __init__(
        self,
        model_or_path: str | os.PathLike[str] | torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        add_special_tokens: bool = False,
    ) -> None:
        from revmix.platform.models import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"HFGenerator batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        if isinstance(model_or_path, (str, os.PathLike)):
            path = resolve_model_dir(model_or_path)
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model = load_model(path, dtype=_dtype_name(dtype, self.device), device=self.device).eval()
            self.tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
            self.name_or_path = path
        elif isinstance(model_or_path, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("HFGenerator(model) with an in-memory model needs tokenizer=")
            self.model = model_or_path
            self.device = torch.device(device) if device else next(model_or_path.parameters()).device
            self.tokenizer = tokenizer
            self.name_or_path = (
                getattr(getattr(model_or_path, "config", None), "name_or_path", "") or "<model>"
            )
        else:
            raise TypeError(
                f"HFGenerator expects a model directory, run directory or torch.nn.Module, "
                f"got {type(model_or_path).__name__}"
            )
        if isinstance(self.tokenizer, (str, os.PathLike)):
            self.tokenizer = load_tokenizer(os.fspath(self.tokenizer))
        self.eos_ids = eos_token_ids(self.model, self.tokenizer, repr(self.name_or_path))
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)  # rows a token id may index
        fwd = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in fwd or any(p.kind == p.VAR_KEYWORD for p in fwd.values())
        self._lock = threading.Lock()  # one forward at a time when shared by server threads
        # probes (the serving platform's periodic check and a client's GET /health) wait for each other, so
        # a probe finds the model lock held only by a generation and "busy" means what it says
        self._probe_lock = threading.Lock()
        self._fork_devices = [self.device] if self.device.type == "cuda" else []

    # ------------------------------------------------------------------ helpers

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, exactly as generation and scoring see them."""
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of one token sequence (the tokenizer's ``decode`` also takes batches, hence its wider type)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)  # one flat sequence decodes to one string
        return text

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._lock, torch.inference_mode(), _attention_backends(self.device):
                yield
        finally:
            if was_training:
                self.model.train()

    def probe(self) -> bool:
        """One forward pass of one token, to tell a working model from a broken one (the server's health check).

        False when a generation holds the model (it is evidently in use; waiting behind it would make a health
        check as slow as the longest request); True when the logits are finite; raises otherwise. Concurrent
        probes take turns (one token each), so one probe never reports another as a generation.
        """
        with self._probe_lock:
            if not self._lock.acquire(blocking=False):
                return False
            try:
                with torch.inference_mode():
                    logits = self.model(input_ids=torch.tensor([[self.pad_id]], device=self.device)).logits
            finally:
                self._lock.release()
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError(f"model {self.name_or_path!r} gives non-finite logits for a one-token prompt")
        return True

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _finish(self, tokens: list[int], params: SamplingParams) -> Completion:
        """Cut one generated row at EOS (or trailing pad), decode, cut at the first stop string."""
        n, hit_eos = len(tokens), False
        for j, t in enumerate(tokens):
            if t in self.eos_ids:
                n, hit_eos = j + 1, True
                break
        if not hit_eos:  # rows stopped by a stop string are padded out to the batch's length
            while n > 0 and tokens[n - 1] == self.pad_id:
                n -= 1
        kept = tokens[: n - 1 if hit_eos else n]
        text, hit_stop = truncate_at_stop(self.decode(kept, skip_special_tokens=True), params.stop)
        if hit_stop:
            kept = self.encode([text])[0] if text else []
        stopped = hit_eos or hit_stop or n < len(tokens) or n < params.max_new_tokens
        return Completion(text, n, "stop" if stopped else "length", tuple(kept))

    # ------------------------------------------------------------------ Generator API

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> list[list[str]]:
        """``params.n`` completions per prompt (see ``Generator.generate``)."""
        return [[c.text for c in row] for row in self.generate_detailed(prompts, params)]

    def generate_detailed(
        self, prompts: list[str], params: SamplingParams | None = None
    ) -> list[list[Completion]]:
        """Like ``generate`` but with token counts and finish reasons (the server reports both)."""
        return self.generate_ids(self.encode(prompts), params)

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Completion]]:
        """``generate_detailed`` for already tokenised prompts (the server accepts token-id prompts).

        ``should_stop`` is polled once per decoding step; when it turns true, decoding ends there (the
        server's requests were all cancelled) and the model is free for the next caller.
        """
        params = params or SamplingParams()
        out: list[list[Completion]] = [[] for _ in prompt_ids]
        if not prompt_ids:
            return out
        if params.max_new_tokens == 0:
            return [[Completion("", 0, "length") for _ in range(params.n)] for _ in prompt_ids]
        if any(not s for s in prompt_ids):
            raise ValueError(
                "HFGenerator.generate got an empty prompt (no tokens); give every prompt some text"
            )
        check_token_ids(prompt_ids, self.vocab_size)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
        cfg = exact_generation_config(params, self.pad_id, self.eos_ids)
        gen_kwargs: dict[str, Any] = {"tokenizer": self.tokenizer} if params.stop else {}
        if should_stop is not None:
            gen_kwargs["stopping_criteria"] = stop_when(should_stop)
        with self._inference():
            for b, start in enumerate(range(0, len(order), self.batch_size)):
                chunk = order[start : start + self.batch_size]
                input_ids, mask = self._left_pad([prompt_ids[i] for i in chunk])
                with torch.random.fork_rng(devices=self._fork_devices):
                    torch.manual_seed(params.seed + b)
                    seqs = self.model.generate(
                        input_ids=input_ids, attention_mask=mask, generation_config=cfg, **gen_kwargs
                    )
                new = seqs[:, input_ids.shape[1] :].tolist()
                for k, i in enumerate(chunk):
                    out[i] = [self._finish(new[k * params.n + j], params) for j in range(params.n)]
        return out

    def score(
        self, prompts: list[str], completions: list[str], max_tokens: int | None = None
    ) -> list[list[float]]:
        """Per-token log-probs of each completion given its prompt (see ``Generator.score``)."""
        targets = self.encode(completions)
        if max_tokens is not None:
            targets = [t[:max_tokens] for t in targets]
        return self.score_ids(self.encode(prompts), targets)

    def score_ids(self, prefixes: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        """log p(targets[i][j] | prefixes[i] + targets[i][:j]) for every i, j: one forward pass per batch."""
        return self.score_ids_top(prefixes, targets, top_k=0)[0]

    def score_ids_top(
        self, prefixes: list[list[int]], targets: list[list[int]], top_k: int = 0
    ) -> tuple[list[list[float]], list[list[list[tuple[int, float]]]]]:
        """``score_ids`` plus, per target position, the ``top_k`` most likely (token id, log-prob) pairs
        (what the OpenAI ``logprobs`` field reports); the second list is empty lists when ``top_k == 0``."""
        if len(prefixes) != len(targets):
            raise ValueError(f"score: {len(prefixes)} prompts but {len(targets)} completions")
        if any(not p for p in prefixes):
            raise ValueError(
                "score: every prompt needs at least one token (the first completion token needs context)"
            )
        check_token_ids(prefixes, self.vocab_size)
        check_token_ids(targets, self.vocab_size)
        logps: list[list[float]] = [[] for _ in prefixes]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in prefixes]
        order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(targets[i]), reverse=True)
        with self._inference():
            for start in range(0, len(order), self.batch_size):
                chunk = [i for i in order[start : start + self.batch_size] if targets[i]]
                if not chunk:
                    continue
                k = max(len(targets[i]) for i in chunk)
                input_ids, mask = self._left_pad([prefixes[i] + targets[i] for i in chunk])
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                kwargs = {"logits_to_keep": k + 1} if self._logits_to_keep else {}
                logits = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=False,
                    **kwargs,
                ).logits
                logits = logits[:, -(k + 1) : -1]  # position t predicts token t+1: the last k tokens
                for row, i in enumerate(chunk):
                    n = len(targets[i])
                    scored = logits[row : row + 1, k - n :]
                    tgt = torch.tensor([targets[i]], device=scored.device)
                    logps[i] = target_logps(scored, tgt)[0].tolist()  # chunked: no fp32 [n, V] for ALP
                    if top_k > 0:  # the top-k alternatives need the whole distribution
                        logp = torch.log_softmax(scored[0].float(), dim=-1)
                        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                        tops[i] = [list(zip(ix, v)) for ix, v in zip(indices.tolist(), values.tolist())]
        return logps, tops

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one greedy/sampled completion as they are decoded (n must be 1).

        Text that might be the start of a stop string is held back until it is known not to be one, so the
        concatenated deltas equal ``generate([prompt], params)[0][0]``.
        """
        return self.stream_ids(self.encode([prompt])[0], params)

    def stream_ids(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """``stream`` for an already tokenised prompt. Decoding stops at the next step once ``should_stop()``
        is true or this iterator is closed (an abandoned stream must not keep the model busy)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("HFGenerator.stream supports n=1 only")
        if not prompt_ids:
            raise ValueError("HFGenerator.stream got an empty prompt (no tokens)")
        check_token_ids([prompt_ids], self.vocab_size)
        if params.max_new_tokens == 0:
            return
        closed = threading.Event()
        try:
            yield from self._stream(
                prompt_ids, params, lambda: closed.is_set() or bool(should_stop and should_stop())
            )
        finally:
            closed.set()

    def _stream(
        self, prompt_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        input_ids, mask = self._left_pad([prompt_ids])
        cfg = exact_generation_config(params, self.pad_id, self.eos_ids)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._inference(), torch.random.fork_rng(devices=self._fork_devices):
                    torch.manual_seed(params.seed)
                    self.model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        generation_config=cfg,
                        streamer=streamer,
                        stopping_criteria=stop_when(should_stop),
                        **({"tokenizer": self.tokenizer} if params.stop else {}),
                    )
            except BaseException as e:  # surfaced in the consumer thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        hold = max((len(s) for s in params.stop), default=1) - 1
        text, sent = "", 0
        for delta in streamer:
            text += delta
            cut, hit = truncate_at_stop(text, params.stop)
            if hit:
                if len(cut) > sent:
                    yield cut[sent:]
                sent = len(cut)
                for _ in streamer:  # drain, so the worker thread can finish
                    pass
                break
            safe = len(text) - hold
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            if len(text) > sent:
                yield text[sent:]
        thread.join()
        if errors:
            raise errors[0]


def check_token_ids(seqs: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raise ValueError naming the first token id outside [0, vocab_size): an embedding lookup with one fails
    every prompt batched with it, and on a GPU leaves the device unusable (a device-side assert)."""
    for i, seq in enumerate(seqs):
        if seq and (min(seq) < 0 or max(seq) >= vocab_size):
            j, bad = next((j, t) for j, t in enumerate(seq) if not 0 <= t < vocab_size)
            raise ValueError(
                f"token id {bad} (prompt {i}, position {j}) is outside the vocabulary: valid ids are 0 to "
                f"{vocab_size - 1}"
            )


def stop_when(should_stop: Callable[[], bool]) -> Any:
    """A ``StoppingCriteriaList`` that ends ``model.generate`` at the next step once ``should_stop()``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhen(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            stop = should_stop()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    return StoppingCriteriaList([_StopWhen()])


def eos_token_ids(model: Any, tokenizer: Any, name: str = "model") -> list[int]:
    """Every token id that ends a response: the model's generation config and the tokenizer's
    (Qwen-style models list several)."""
    ids: list[int] = []
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError(
            f"{name}: the model and its tokenizer define no eos_token_id; generation could never stop"
        )
    return ids


def exact_generation_config(params: SamplingParams, pad_id: int, eos_ids: Sequence[int]) -> Any:
    """A ``GenerationConfig`` that samples exactly softmax(logits / T) with top-p and nothing else.

    Everything that changes the distribution is set explicitly: unset fields would be filled from the
    checkpoint's generation_config.json (e.g. repetition_penalty, top_k=50), breaking parity with vLLM and
    the log-probs PPO assumes for its samples.
    """
    from transformers import GenerationConfig

    sample = not params.greedy
    knobs = dict(temperature=params.temperature, top_p=params.top_p, top_k=0, min_p=None, typical_p=1.0)
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        **(knobs if sample else {}),
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=params.n,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
        use_cache=True,
        stop_strings=list(params.stop) or None,
    )
