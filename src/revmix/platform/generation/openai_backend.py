"""OpenAI-compatible backend: a ``revmix serve`` app, a vLLM server, or a teacher model behind an API.

Requests go out through the official ``openai`` client on a bounded thread pool (``concurrency``). The
client retries, ``max_retries`` times, the failures that retrying can fix — connection errors, time-outs,
408/409/429 and 5xx — with its own exponential back-off and jitter, honouring a server's ``Retry-After``;
``timeout`` bounds each attempt. Other errors (a 400 for a bad parameter, a 404 for an unknown model) fail
at once. What this module adds is the error: it names the endpoint, the model and the route that failed.

``score`` uses the completions route with ``echo=True, logprobs=1, max_tokens=0``: the server returns the
log-prob of every prompt token, and the completion's are the last ones. With a tokenizer the prompt is sent
as token ids, so the completion's tokens are exactly ``tokenizer(completion)`` (the same tokens
``HFGenerator.score`` scores); without one the split is made by character offset (``text_offset``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from revmix.platform.generation.protocol import SamplingParams, chat_prompt, truncate_at_stop

if TYPE_CHECKING:
    import openai

T = TypeVar("T")


class EndpointError(RuntimeError):
    """A request to an OpenAI-compatible endpoint failed (after the client's retries, where it retries)."""


class OpenAIGenerator:
    """``Generator`` over an OpenAI-compatible HTTP endpoint.

    ``chat=True`` sends each prompt as one user message to ``/chat/completions`` (the server applies its
    chat template, so prompts are bare questions: see ``protocol.prepare_prompts``); ``chat=False`` sends
    raw prompts to ``/completions``. ``model=None`` uses the first model the endpoint lists.
    ``api_key=None`` reads ``REVMIX_API_KEY`` (the key ``revmix serve`` reads), then ``OPENAI_API_KEY``.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        chat: bool = True,
        tokenizer: Any = None,
    ) -> None:
        import openai

        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(
                f"OpenAIGenerator: need concurrency >= 1, max_retries >= 0, timeout > 0; "
                f"got {concurrency}, {max_retries}, {timeout}"
            )
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.concurrency, self.chat = max_retries, concurrency, chat
        if api_key is None:  # a server started with a key accepts the same variable's value
            api_key = os.environ.get("REVMIX_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )
        if isinstance(tokenizer, (str, os.PathLike)):
            from revmix.platform.models import load_tokenizer

            tokenizer = load_tokenizer(os.fspath(tokenizer))
        self.tokenizer = tokenizer
        self._model = model
        self._echo_max_tokens = 0  # becomes 1 for servers that reject max_tokens=0 with echo

    # ------------------------------------------------------------------ plumbing

    @property
    def model(self) -> str:
        if self._model is None:
            models = self._call("GET /models", lambda: self.client.models.list().data)
            if not models:
                raise EndpointError(f"{self.base_url}/models lists no models; pass model= explicitly")
            self._model = models[0].id
        return self._model

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, whose failure (after the client's retries) becomes an error naming endpoint, model, route."""
        import openai

        where = f"{what} on {self.base_url} (model {self._model!r})"
        attempts = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        try:
            return fn()
        except openai.APIStatusError as e:
            retried = e.status_code in (408, 409, 429) or e.status_code >= 500  # what the client retries
            after = f" after {attempts}" if retried else ""
            raise EndpointError(
                f"{where} failed{after} with HTTP {e.status_code}: {_error_message(e)}"
            ) from e
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise EndpointError(
                f"{where} failed after {attempts}: {type(e).__name__}: {_error_message(e)}"
            ) from e

    def _map(self, fn: Callable[[Any], T], items: list[Any]) -> list[T]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ Generator API

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> list[list[str]]:
        """``params.n`` completions per prompt, requests sent ``concurrency`` at a time."""
        params = params or SamplingParams()
        if params.max_new_tokens == 0:
            return [[""] * params.n for _ in prompts]
        common: dict[str, Any] = dict(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            n=params.n,
            seed=params.seed,
        )
        if params.stop:
            common["stop"] = list(params.stop)
        model = self.model

        def one(prompt: str) -> list[str]:
            if self.chat:
                resp = self._call(
                    "POST /chat/completions",
                    lambda: self.client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], **common
                    ),
                )
                texts = [c.message.content or "" for c in sorted(resp.choices, key=lambda c: c.index)]
            else:
                resp = self._call(
                    "POST /completions",
                    lambda: self.client.completions.create(model=model, prompt=prompt, **common),
                )
                texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
            if len(texts) != params.n:
                raise EndpointError(f"{self.base_url} returned {len(texts)} choices for n={params.n}")
            return [truncate_at_stop(t, params.stop)[0] for t in texts]

        return self._map(one, list(prompts))

    def score(
        self, prompts: list[str], completions: list[str], max_tokens: int | None = None
    ) -> list[list[float]]:
        """Per-token completion log-probs through ``/completions`` with ``echo=True`` (see module doc).

        In chat mode the prompts are questions: the chat template is applied client-side, which needs
        ``tokenizer=``; without one this raises NotImplementedError.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        if self.chat:
            if self.tokenizer is None:
                raise NotImplementedError(
                    "OpenAIGenerator(chat=True).score needs tokenizer= to apply the chat template client-side "
                    "(chat endpoints cannot echo prompt log-probs); or use chat=False with templated prompts"
                )
            prompts = [chat_prompt(self.tokenizer, p) for p in prompts]
        model = self.model
        return self._map(
            lambda pc: self._score_one(model, pc[0], pc[1], max_tokens), list(zip(prompts, completions))
        )

    def _echo(self, model: str, prompt: str | list[int]) -> Any:
        def request(max_new: int) -> Any:
            return self.client.completions.create(
                model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=max_new, temperature=0.0
            )

        try:
            resp = self._call("POST /completions (echo, logprobs)", lambda: request(self._echo_max_tokens))
        except EndpointError as e:
            if self._echo_max_tokens != 0 or "HTTP 400" not in str(e):
                raise
            self._echo_max_tokens = 1  # some servers need >= 1 new token; it is dropped below
            resp = self._call("POST /completions (echo, logprobs)", lambda: request(1))
        logprobs = resp.choices[0].logprobs if resp.choices else None
        if logprobs is None or not logprobs.token_logprobs:
            raise NotImplementedError(
                f"{self.base_url}/completions returned no prompt log-probs for echo=True, logprobs=1; "
                "this endpoint cannot score completions"
            )
        return logprobs

    def _score_one(self, model: str, prompt: str, completion: str, max_tokens: int | None) -> list[float]:
        if self.tokenizer is not None:
            p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            c = c if max_tokens is None else c[:max_tokens]
            if not c:
                return []
            lp = self._echo(model, p + c)
            values = list(lp.token_logprobs[len(p) : len(p) + len(c)])
        else:
            if not completion:
                return []
            full = prompt + completion
            lp = self._echo(model, full)
            start, end = len(prompt), len(full)
            values = [v for off, v in zip(lp.text_offset, lp.token_logprobs) if start <= off < end]
            values = values if max_tokens is None else values[:max_tokens]
        if any(v is None for v in values):
            raise EndpointError(f"{self.base_url}/completions echoed a null log-prob inside the completion")
        return [float(v) for v in values]


def _error_message(e: openai.APIError) -> str:
    """The server's own message (``{"error": {"message": ...}}`` in the body) when it sent one."""
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(e)
