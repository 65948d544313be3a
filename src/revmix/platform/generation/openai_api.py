"""The OpenAI wire format over an ``HFGenerator``: request validation, responses, log-probs, streaming.

Pure Python (no Ray, no web framework) so the protocol is tested in milliseconds; ``serve.py`` wraps it
in a Ray Serve FastAPI deployment. Generation goes through an injected async ``generate(ids, params)`` so
the deployment can batch concurrent requests into one ``model.generate`` call (``serve.batch``);
``generate_isolated`` runs such a batch so that one failing request fails only itself.

Routes covered: ``GET /v1/models``, ``POST /v1/completions`` (string / token-id / batched prompts, ``n``,
``stop``, ``seed``, ``logprobs``, ``echo`` — with ``max_tokens=0`` this scores a prompt, which is how
``OpenAIGenerator.score`` works), ``POST /v1/chat/completions`` (``logprobs`` / ``top_logprobs``), and
``stream=True`` on both (server-sent events, n=1).

What a request may ask is bounded by ``ServerLimits`` (each a ``revmix serve`` flag, named in the 4xx error
it causes); token-id prompts are checked against the vocabulary. Unexpected failures answer 500 with an
error id and log the traceback under that id: the client never sees the server's internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from revmix.platform.generation.protocol import SamplingParams

if TYPE_CHECKING:  # hf imports torch; `revmix serve` reads ServerLimits while it parses its arguments
    from revmix.platform.generation.hf import Completion, HFGenerator

GenerateFn = Callable[[list[int], SamplingParams], Awaitable[list["Completion"]]]
MAX_LOGPROBS = 20
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
API_KEY_ENV = "REVMIX_API_KEY"  # where `revmix serve` reads its API key when --api-key is not given
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server. Each field is the ``revmix serve`` flag of the same name
    (``max_n`` is ``--max-n``), and the error a request over it gets names that flag."""

    max_body_bytes: int = 4 * 2**20  # ~1M tokens as JSON; a long prompt as text is far smaller
    max_prompts: int = 64  # per /v1/completions request
    max_n: int = 16  # completions per prompt
    max_tokens: int = 4096  # new tokens per completion (the context window may allow fewer)
    request_timeout_s: float = 600.0  # generation time of one request, streams included

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{limit_flag(name)} must be a positive number, got {value!r}")


def limit_flag(name: str) -> str:
    """The ``revmix serve`` flag that sets ``ServerLimits.<name>``."""
    return "--" + name.replace("_", "-")


def limit_error(
    status: int, what: str, name: str, limits: ServerLimits, param: str | None = None
) -> APIError:
    """A request over one of the server's limits: what it asked, the limit, and the flag that sets it."""
    limit = asdict(limits)[name]
    return APIError(
        status, f"{what}; this server's limit is {limit:g} (revmix serve {limit_flag(name)})", param
    )


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` (plus ``id``
    for an internal error, the key to its traceback in the server's log)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        error_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.error_id = status, message, param, error_id
        self.type = type_ or ("invalid_request_error" if status < 500 else "internal_error")

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param}
        error["code"] = self.status
        if self.error_id is not None:
            error["id"] = self.error_id
        return {"error": error}


def internal_error(exc: BaseException, status: int = 500) -> APIError:
    """An unexpected failure as the client sees it: a fresh error id, nothing of the exception. The
    traceback is logged under that id, so whoever runs the server can find it from the client's report."""
    error_id = uuid.uuid4().hex[:16]
    log.error("error id %s: %s", error_id, type(exc).__name__, exc_info=exc)
    message = f"internal server error (error id {error_id}; the server's log has the details)"
    return APIError(status, message, error_id=error_id)


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise APIError(400, f"'{key}' must be {bound}, got {value!r}", key)
    return value


def _float(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", key)
    return float(value)


def parse_sampling(
    body: dict[str, Any], max_tokens: int, limits: ServerLimits | None = None
) -> SamplingParams:
    """OpenAI sampling fields → ``SamplingParams`` (OpenAI defaults: temperature 1, random seed)."""
    limits = limits or ServerLimits()
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of non-empty strings, got {stop!r}", "stop")
    seed = _int(body, "seed", None, -(2**63))
    temperature = _float(body, "temperature", 1.0)
    if seed is None:  # greedy needs no seed; a fixed one lets greedy requests share a batch
        seed = 0 if temperature == 0 else secrets.randbits(31)
    n = _int(body, "n", 1, 1) or 1
    if n > limits.max_n:
        raise limit_error(400, f"'n' is {n}", "max_n", limits, "n")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=_float(body, "top_p", 1.0),
            stop=tuple(stop),
            seed=seed,
            n=n,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e


def parse_prompts(
    prompt: Any, encode: Callable[[list[str]], list[list[int]]], limits: ServerLimits | None = None
) -> list[tuple[str | None, list[int]]]:
    """The four OpenAI prompt forms — str, [str], [int], [[int]] — as (text or None, token ids) pairs.
    More prompts than ``limits.max_prompts`` are refused before any is tokenised."""
    many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    if many and limits is not None and len(prompt) > limits.max_prompts:
        raise limit_error(400, f"'prompt' holds {len(prompt)} prompts", "max_prompts", limits, "prompt")
    if isinstance(prompt, str):
        return [(prompt, encode([prompt])[0])]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(zip(prompt, encode(prompt)))
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [(None, list(prompt))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [(None, list(p)) for p in prompt]
    raise APIError(
        400, "'prompt' must be a string, a list of strings, a list of token ids or a list of those", "prompt"
    )


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages with string content (text parts of list content are joined)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def no_tokens(n: int) -> list[Completion]:
    """``n`` empty completions: the answer to ``max_tokens=0`` (prompt scoring), no model call needed."""
    from revmix.platform.generation.hf import Completion

    return [Completion("", 0, "length")] * n


@dataclass(eq=False)
class GenerationJob:
    """One request's share of a batch. ``cancelled`` is set once nobody waits for the answer (the client
    left, or the request ran out of time); decoding stops when every job of its call is cancelled."""

    ids: list[int]
    params: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)


async def generate_isolated(
    gen: HFGenerator, jobs: list[GenerationJob]
) -> list[list[Completion] | Exception]:
    """Requests that arrive together: one ``generate_ids`` call per distinct SamplingParams. Each job's
    answer is its completions or the exception that failed it; a failed call is run again one job at a
    time, so a bad request fails only itself, never the requests it was batched with."""
    groups: dict[SamplingParams, list[int]] = {}
    for k, job in enumerate(jobs):
        groups.setdefault(job.params, []).append(k)
    out: list[list[Completion] | Exception] = [[] for _ in jobs]
    for members in groups.values():
        for k, result in zip(members, await _generate_group(gen, [jobs[k] for k in members])):
            out[k] = result
    return out


async def _generate_group(gen: HFGenerator, group: list[GenerationJob]) -> list[list[Completion] | Exception]:
    def all_cancelled() -> bool:
        return all(job.cancelled.is_set() for job in group)

    try:
        ids = [job.ids for job in group]
        return list(await asyncio.to_thread(gen.generate_ids, ids, group[0].params, all_cancelled))
    except Exception as e:
        if len(group) == 1:
            return [e]
    out: list[list[Completion] | Exception] = []
    for job in group:  # which request broke the call is unknown: alone, only that one fails again
        out.extend(await _generate_group(gen, [job]))
    return out


@dataclass
class _Scored:
    """Tokens (ids), their log-probs (None for a first prompt token) and top alternatives."""

    ids: list[int]
    logps: list[float | None]
    tops: list[list[tuple[int, float]]]


class OpenAIHandler:
    """OpenAI routes over one ``HFGenerator`` serving one model name, within ``limits``."""

    def __init__(self, generator: HFGenerator, name: str, limits: ServerLimits | None = None) -> None:
        self.gen, self.name, self.created = generator, name, int(time.time())
        self.limits = limits or ServerLimits()
        config = getattr(generator.model, "config", None)
        self.max_len: int | None = getattr(config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ helpers

    def models(self) -> dict[str, Any]:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "revmix"}
        return {"object": "list", "data": [card]}

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``GET /health``: a one-token forward pass when the model is idle ("checked":
        "forward"); "busy" when a generation holds it; 503 with an error id when the model fails or gives
        non-finite logits. Blocking (a forward pass): call it from a thread."""
        try:
            idle = self.gen.probe()
        except Exception as e:
            return 503, {"status": "error", "model": self.name, **internal_error(e, 503).body()}
        return 200, {"status": "ok", "model": self.name, "checked": "forward" if idle else "busy"}

    def _check(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if body.get("model") != self.name:
            raise APIError(
                404,
                f"The model `{body.get('model')}` does not exist; served: ['{self.name}']",
                "model",
                "NotFoundError",
            )
        return body

    def _prompts(self, body: dict[str, Any]) -> list[tuple[str | None, list[int]]]:
        """The request's prompts, within the prompt limit, non-empty, token ids inside the vocabulary."""
        from revmix.platform.generation.hf import check_token_ids

        prompts = parse_prompts(body.get("prompt"), self.gen.encode, self.limits)
        if any(not ids for _, ids in prompts):
            raise APIError(400, "every prompt needs at least one token", "prompt")
        try:  # text was tokenised by the model's own tokenizer; ids from the client may be anything
            check_token_ids([ids for text, ids in prompts if text is None], self.gen.vocab_size)
        except ValueError as e:
            raise APIError(400, f"'prompt': {e}", "prompt") from e
        return prompts

    def _room(self, n_prompt: int, wanted: int | None, param: str = "max_tokens") -> int:
        """``max_tokens`` checked against the server's limit and the context window (default: all the room
        left, as vLLM does, up to the limit)."""
        if wanted is not None and wanted > self.limits.max_tokens:
            raise limit_error(400, f"'{param}' is {wanted}", "max_tokens", self.limits, param)
        if self.max_len is None:
            return min(256, self.limits.max_tokens) if wanted is None else wanted
        room = self.max_len - n_prompt
        if wanted is None:
            return min(max(room, 0), self.limits.max_tokens)
        if wanted > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_len} tokens; the prompt has {n_prompt} and "
                f"{wanted} more were requested",
                param,
            )
        return wanted

    def _completion_max_tokens(self, body: dict[str, Any]) -> int:
        """``max_tokens`` of /v1/completions: OpenAI's default is 16 (this server's limit, if lower)."""
        wanted = _int(body, "max_tokens", None, 0)
        return min(COMPLETIONS_MAX_TOKENS, self.limits.max_tokens) if wanted is None else wanted

    def _decode(self, ids: list[int]) -> list[str]:
        return [self.gen.decode([t]) for t in ids]

    def _top_dict(self, alts: list[tuple[int, float]]) -> dict[str, float]:
        """{decoded token: log-prob}, most likely first; tokens that decode alike keep the higher value."""
        out: dict[str, float] = {}
        for t, v in alts:
            out.setdefault(self.gen.decode([t]), v)
        return out

    def _offsets(self, text: str | None, ids: list[int], base: int) -> list[int]:
        """Character offset of each token in ``text`` (re-tokenised with offsets when the text is known)."""
        if text is not None:
            enc = self.gen.tokenizer(
                text, add_special_tokens=self.gen.add_special_tokens, return_offsets_mapping=True
            )
            if enc["input_ids"] == ids:
                return [base + start for start, _ in enc["offset_mapping"]]
        out, pos = [], base
        for piece in self._decode(ids):
            out.append(pos)
            pos += len(piece)
        return out

    async def _score(self, jobs: list[tuple[list[int], list[int], bool]], top_k: int) -> list[_Scored]:
        """Log-probs for (prefix, tokens, first_is_unscored) jobs, in one batched forward pass."""
        prefixes, targets = [], []
        for prefix, tokens, first_unscored in jobs:
            prefixes.append(tokens[:1] if first_unscored else prefix)
            targets.append(tokens[1:] if first_unscored else tokens)
        logps, tops = await asyncio.to_thread(self.gen.score_ids_top, prefixes, targets, top_k)
        out = []
        for (_, tokens, first_unscored), lp, tp in zip(jobs, logps, tops):
            row_logps: list[float | None] = [None, *lp] if first_unscored else list(lp)
            row_tops = [[], *tp] if first_unscored else tp
            out.append(_Scored(tokens, row_logps, row_tops or [[] for _ in tokens]))
        return out

    # ------------------------------------------------------------------ /v1/completions

    async def completions(self, body: Any, generate: GenerateFn) -> dict[str, Any]:
        body = self._check(body)
        prompts = self._prompts(body)
        echo = bool(body.get("echo", False))
        top = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        wanted = self._completion_max_tokens(body)
        max_tokens = min(self._room(len(ids), wanted) for _, ids in prompts)
        params = parse_sampling(body, max_tokens, self.limits)
        if max_tokens > 0:
            results = await asyncio.gather(*(generate(ids, params) for _, ids in prompts))
        else:
            results = [no_tokens(params.n) for _ in prompts]
        jobs: list[tuple[list[int], list[int], bool]] = []
        sources: list[tuple[str | None, list[int], str, Completion]] = []  # what each choice was made of
        choices: list[dict[str, Any]] = []  # JSON response objects
        for (text, ids), comps in zip(prompts, results):
            ptext = text if text is not None else self.gen.decode(ids)
            for comp in comps:
                gen_ids = list(comp.token_ids)
                jobs.append((ids, ids + gen_ids if echo else gen_ids, echo))
                sources.append((text, ids, ptext, comp))
                choices.append(
                    {
                        "index": len(choices),
                        "text": (ptext if echo else "") + comp.text,
                        "logprobs": None,
                        "finish_reason": comp.finish_reason,
                    }
                )
        if top is not None:
            for choice, s, (text, ids, ptext, comp) in zip(choices, await self._score(jobs, top), sources):
                n_prompt = len(ids) if echo else 0
                offsets = (self._offsets(text, ids, 0) if echo else []) + self._offsets(
                    comp.text, s.ids[n_prompt:], len(ptext) if echo else 0
                )
                choice["logprobs"] = {
                    "tokens": self._decode(s.ids),
                    "token_logprobs": s.logps,
                    "top_logprobs": [
                        None if lp is None else self._top_dict(alts) for lp, alts in zip(s.logps, s.tops)
                    ],
                    "text_offset": offsets,
                }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": self._usage(sum(len(ids) for _, ids in prompts), results),
        }

    # ------------------------------------------------------------------ /v1/chat/completions

    def chat_prompt_ids(self, body: dict[str, Any]) -> list[int]:
        messages = parse_messages(body.get("messages"))
        if not getattr(self.gen.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.name!r} has no chat template; use /v1/completions")
        from jinja2 import TemplateError

        try:  # a template may refuse a conversation (e.g. roles that do not alternate): the client's to fix
            text = self.gen.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except TemplateError as e:
            raise APIError(400, f"'messages' do not fit the model's chat template: {e}", "messages") from e
        assert isinstance(text, str)  # tokenize=False renders the conversation as text
        return self.gen.encode([text])[0]

    def _chat_max_tokens(self, body: dict[str, Any], n_prompt: int) -> int:
        if body.get("max_completion_tokens") is not None:
            return self._room(n_prompt, _int(body, "max_completion_tokens", None, 0), "max_completion_tokens")
        return self._room(n_prompt, _int(body, "max_tokens", None, 0))

    async def chat(self, body: Any, generate: GenerateFn) -> dict[str, Any]:
        body = self._check(body)
        ids = self.chat_prompt_ids(body)
        params = parse_sampling(body, self._chat_max_tokens(body, len(ids)), self.limits)
        want_logprobs = bool(body.get("logprobs", False))
        top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS) or 0
        comps = await generate(ids, params) if params.max_new_tokens > 0 else no_tokens(params.n)
        choices: list[dict[str, Any]] = [  # JSON response objects
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(comps)
        ]
        if want_logprobs:
            jobs = [(ids, list(c.token_ids), False) for c in comps]
            for choice, s in zip(choices, await self._score(jobs, top)):
                choice["logprobs"] = {
                    "content": [
                        {**self._chat_logprob(t, lp), "top_logprobs": [self._chat_logprob(*a) for a in alts]}
                        for t, lp, alts in zip(s.ids, s.logps, s.tops)
                    ]
                }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": self._usage(len(ids), [comps]),
        }

    def _chat_logprob(self, token: int, logprob: float | None) -> dict[str, Any]:
        """One token of a chat ``logprobs.content`` list: its text, log-prob and UTF-8 bytes."""
        text = self.gen.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    @staticmethod
    def _usage(prompt_tokens: int, results: list[list[Completion]]) -> dict[str, int]:
        completion_tokens = sum(c.n_tokens for comps in results for c in comps)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # ------------------------------------------------------------------ streaming

    def stream_plan(self, body: Any, chat: bool) -> tuple[list[int], SamplingParams]:
        """Validate a ``stream=True`` request (n=1, one prompt, no echo/logprobs) → (prompt ids, params)."""
        body = self._check(body)
        if chat:
            ids = self.chat_prompt_ids(body)
            max_tokens = self._chat_max_tokens(body, len(ids))
        else:
            prompts = self._prompts(body)
            if len(prompts) != 1 or body.get("echo") or body.get("logprobs") is not None:
                raise APIError(400, "stream=True supports one prompt without echo or logprobs", "stream")
            ids = prompts[0][1]
            max_tokens = self._room(len(ids), self._completion_max_tokens(body))
        params = parse_sampling(body, max_tokens, self.limits)
        if params.n != 1:
            raise APIError(400, "stream=True supports n=1 only", "n")
        return ids, params

    def _chunk(
        self, rid: str, created: int, chat: bool, delta: str | None, finish: str | None, first: bool
    ) -> str:
        """One server-sent event of a stream (a chat stream's first chunk announces the assistant role)."""
        if chat:
            d: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            )
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk" if chat else "text_completion"
        chunk = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"

    async def stream_events(self, ids: list[int], params: SamplingParams, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk with finish_reason, then [DONE].

        However the stream ends — finished, out of time (an error event names the limit), failed (an error
        event with an error id) or abandoned by its client (this generator is closed or cancelled) — the
        model stops decoding at its next step, so it is free for the next request."""
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if chat:
            yield self._chunk(rid, created, chat, None, None, first=True)
        cancelled = threading.Event()
        deltas: Iterator[str] = self.gen.stream_ids(ids, params, cancelled.is_set)
        deadline = time.monotonic() + self.limits.request_timeout_s
        text, error = "", None
        try:
            while True:
                try:
                    left = deadline - time.monotonic()
                    delta = await asyncio.wait_for(asyncio.to_thread(next, deltas, None), left)
                except TimeoutError:
                    what = f"the stream ran past {self.limits.request_timeout_s:g} s"
                    error = limit_error(408, what, "request_timeout_s", self.limits)
                except Exception as e:
                    error = internal_error(e)
                if error is not None or delta is None:
                    break
                text += delta
                yield self._chunk(rid, created, chat, delta, None, first=False)
        finally:
            cancelled.set()
        if error is not None:
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            n_tokens = len(self.gen.encode([text])[0]) if text else 0
            finish = "length" if n_tokens >= params.max_new_tokens else "stop"
            yield self._chunk(rid, created, chat, None, finish, first=False)
        yield "data: [DONE]\n\n"
