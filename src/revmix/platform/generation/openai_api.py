"""The OpenAI wire format over an ``HFGenerator``: request validation, responses, log-probs, streaming.

Pure Python (no Ray, no web framework) so the protocol is tested in milliseconds; ``serve.py`` wraps it
in a Ray Serve FastAPI deployment. Generation goes through an injected async ``generate(ids, params)`` so
the deployment can batch concurrent requests into one ``model.generate`` call (``serve.batch``).

Routes covered: ``GET /v1/models``, ``POST /v1/completions`` (string / token-id / batched prompts, ``n``,
``stop``, ``seed``, ``logprobs``, ``echo`` — with ``max_tokens=0`` this scores a prompt, which is how
``OpenAIGenerator.score`` works), ``POST /v1/chat/completions`` (``logprobs`` / ``top_logprobs``), and
``stream=True`` on both (server-sent events, n=1).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from revmix.platform.generation.hf import Completion, HFGenerator
from revmix.platform.generation.protocol import SamplingParams

GenerateFn = Callable[[list[int], SamplingParams], Awaitable[list[Completion]]]
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or ("invalid_request_error" if status < 500 else "internal_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


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


def parse_sampling(body: dict[str, Any], max_tokens: int) -> SamplingParams:
    """OpenAI sampling fields → ``SamplingParams`` (OpenAI defaults: temperature 1, random seed)."""
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
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=_float(body, "top_p", 1.0),
            stop=tuple(stop),
            seed=seed,
            n=_int(body, "n", 1, 1, 128) or 1,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from e


def parse_prompts(
    prompt: Any, encode: Callable[[list[str]], list[list[int]]]
) -> list[tuple[str | None, list[int]]]:
    """The four OpenAI prompt forms — str, [str], [int], [[int]] — as (text or None, token ids) pairs."""
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


@dataclass
class _Scored:
    """Tokens (ids), their log-probs (None for a first prompt token) and top alternatives."""

    ids: list[int]
    logps: list[float | None]
    tops: list[list[tuple[int, float]]]


class OpenAIHandler:
    """OpenAI routes over one ``HFGenerator`` serving one model name."""

    def __init__(self, generator: HFGenerator, name: str) -> None:
        self.gen, self.name, self.created = generator, name, int(time.time())
        config = getattr(generator.model, "config", None)
        self.max_len: int | None = getattr(config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ helpers

    def models(self) -> dict[str, Any]:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "revmix"}
        return {"object": "list", "data": [card]}

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

    def _room(self, n_prompt: int, wanted: int | None) -> int:
        """``max_tokens`` checked against the context window (default: all the room left, as vLLM does)."""
        if self.max_len is None:
            return 256 if wanted is None else wanted
        room = self.max_len - n_prompt
        if wanted is None:
            return max(room, 0)
        if wanted > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_len} tokens; the prompt has {n_prompt} and "
                f"{wanted} more were requested",
                "max_tokens",
            )
        return wanted

    def _decode(self, ids: list[int]) -> list[str]:
        return [self.gen.tokenizer.decode([t]) for t in ids]

    def _top_dict(self, alts: list[tuple[int, float]]) -> dict[str, float]:
        """{decoded token: log-prob}, most likely first; tokens that decode alike keep the higher value."""
        out: dict[str, float] = {}
        for t, v in alts:
            out.setdefault(self.gen.tokenizer.decode([t]), v)
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
            if first_unscored:
                lp, tp = [None, *lp], [[], *tp]
            out.append(_Scored(tokens, list(lp), tp or [[] for _ in tokens]))
        return out

    # ------------------------------------------------------------------ /v1/completions

    async def completions(self, body: Any, generate: GenerateFn) -> dict[str, Any]:
        body = self._check(body)
        prompts = parse_prompts(body.get("prompt"), self.gen.encode)
        if any(not ids for _, ids in prompts):
            raise APIError(400, "every prompt needs at least one token", "prompt")
        echo = bool(body.get("echo", False))
        top = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        wanted = _int(body, "max_tokens", 16, 0)
        max_tokens = min(self._room(len(ids), wanted) for _, ids in prompts)
        params = parse_sampling(body, max_tokens)
        if max_tokens > 0:
            results = await asyncio.gather(*(generate(ids, params) for _, ids in prompts))
        else:
            results = [[Completion("", 0, "length")] * params.n for _ in prompts]
        texts = [text if text is not None else self.gen.tokenizer.decode(ids) for text, ids in prompts]
        jobs, choices = [], []
        for (_, ids), ptext, comps in zip(prompts, texts, results):
            for comp in comps:
                gen_ids = list(comp.token_ids)
                jobs.append((ids, ids + gen_ids if echo else gen_ids, echo))
                choices.append(
                    {
                        "index": len(choices),
                        "text": (ptext if echo else "") + comp.text,
                        "logprobs": None,
                        "finish_reason": comp.finish_reason,
                    }
                )
        if top is not None:
            scored = await self._score(jobs, top)
            k = 0
            for (text, ids), ptext, comps in zip(prompts, texts, results):
                for comp in comps:
                    s = scored[k]
                    n_prompt = len(ids) if echo else 0
                    offsets = (self._offsets(text, ids, 0) if echo else []) + self._offsets(
                        comp.text, s.ids[n_prompt:], len(ptext) if echo else 0
                    )
                    choices[k]["logprobs"] = {
                        "tokens": self._decode(s.ids),
                        "token_logprobs": s.logps,
                        "top_logprobs": [
                            None if lp is None else self._top_dict(alts) for lp, alts in zip(s.logps, s.tops)
                        ],
                        "text_offset": offsets,
                    }
                    k += 1
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
        text = self.gen.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.gen.encode([text])[0]

    def _chat_max_tokens(self, body: dict[str, Any], n_prompt: int) -> int:
        wanted = _int(body, "max_completion_tokens", None, 0)
        return self._room(n_prompt, _int(body, "max_tokens", None, 0) if wanted is None else wanted)

    async def chat(self, body: Any, generate: GenerateFn) -> dict[str, Any]:
        body = self._check(body)
        ids = self.chat_prompt_ids(body)
        params = parse_sampling(body, self._chat_max_tokens(body, len(ids)))
        want_logprobs = bool(body.get("logprobs", False))
        top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS) or 0
        comps = (
            await generate(ids, params)
            if params.max_new_tokens > 0
            else [Completion("", 0, "length")] * params.n
        )
        choices = [
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
                        {
                            "token": self.gen.tokenizer.decode([t]),
                            "logprob": lp,
                            "bytes": list(self.gen.tokenizer.decode([t]).encode()),
                            "top_logprobs": [
                                {
                                    "token": self.gen.tokenizer.decode([a]),
                                    "logprob": v,
                                    "bytes": list(self.gen.tokenizer.decode([a]).encode()),
                                }
                                for a, v in alts
                            ],
                        }
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
            prompts = parse_prompts(body.get("prompt"), self.gen.encode)
            if len(prompts) != 1 or body.get("echo") or body.get("logprobs") is not None:
                raise APIError(400, "stream=True supports one prompt without echo or logprobs", "stream")
            ids = prompts[0][1]
            max_tokens = self._room(len(ids), _int(body, "max_tokens", 16, 0))
        params = parse_sampling(body, max_tokens)
        if params.n != 1:
            raise APIError(400, "stream=True supports n=1 only", "n")
        return ids, params

    async def stream_events(self, ids: list[int], params: SamplingParams, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk with finish_reason, then [DONE]."""
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                )
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return (
                "data: "
                + json.dumps(
                    {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
                )
                + "\n\n"
            )

        if chat:
            yield event(None, None, first=True)
        it: Iterator[str] = self.gen.stream_ids(ids, params)
        text = ""
        while (delta := await asyncio.to_thread(next, it, None)) is not None:
            text += delta
            yield event(delta, None)
        n_tokens = len(self.gen.encode([text])[0]) if text else 0
        yield event(None, "length" if n_tokens >= params.max_new_tokens else "stop")
        yield "data: [DONE]\n\n"
