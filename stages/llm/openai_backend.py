"""``openai`` backend: any OpenAI-compatible server (vLLM, SGLang, Ollama, a hosted API).

Requests go out from a bounded thread pool of ``concurrency`` workers (so one stage worker
keeps at most that many requests in flight), each through the official ``openai`` client,
which gives per-request timeouts and retries with exponential backoff and jitter on
connection errors, timeouts, 408/409/429 and 5xx (0.5 s doubling to at most 8 s, or the
server's ``Retry-After``). Images travel as base64 ``data:`` URLs in the chat API's
``image_url`` parts. A request that still fails, or whose response is malformed or empty,
becomes that request's error; ``generate`` never raises.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from pairsift.pipeline.errors import ConfigError
from pairsift.stages.llm import Backend, GenRequest, Generation, chat_messages, short_error


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, model: str, endpoint: str | None, api_key_env: str | None = None, *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, chat: bool | None = None,
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3,
                 check_endpoint: bool = True):
        self.model = model
        self.endpoint = endpoint
        self.api_key_env = api_key_env
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.uses_chat = True if chat is None else chat
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.check_endpoint = check_endpoint
        self._client = None
        self._pool: ThreadPoolExecutor | None = None

    # -- configuration -------------------------------------------------------------------
    def _api_key(self) -> str:
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return "EMPTY"  # local servers need none; the client insists on some value

    def _make_client(self, timeout: float, retries: int):
        import openai

        return openai.OpenAI(base_url=self.endpoint, api_key=self._api_key() or "EMPTY",
                             timeout=timeout, max_retries=retries)

    def check(self) -> None:
        if importlib.util.find_spec("openai") is None:
            raise ConfigError("recaption.backend: openai needs the 'openai' package (pip install openai)")
        if not self.endpoint:
            raise ConfigError("recaption.endpoint: the openai backend needs the server's base URL "
                              "(e.g. http://host:8000/v1)")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ConfigError(f"recaption.api_key_env: environment variable {self.api_key_env} is not set")
        if self.check_endpoint:
            self._check_served()

    def _check_served(self) -> None:
        """Ask the server which models it serves (``GET /models``): an unreachable endpoint,
        a refused key or a model the server does not serve is a configuration error, found
        before every sample of the job fails with it. Servers without the route pass."""
        import openai

        client = self._make_client(timeout=min(self.timeout_s, 10.0), retries=1)
        try:
            served = [m.id for m in client.models.list()]
        except openai.AuthenticationError as e:
            raise ConfigError(f"recaption.api_key_env: {self.endpoint} refused the key: {short_error(e)}") from None
        except openai.APIConnectionError as e:
            raise ConfigError(f"recaption.endpoint: cannot reach {self.endpoint}: {short_error(e)}") from None
        except (openai.NotFoundError, openai.APIError):
            return
        finally:
            client.close()
        if served and self.model not in served and self.model not in {s.split(":")[0] for s in served}:
            raise ConfigError(f"recaption.model: {self.endpoint} does not serve {self.model!r}; "
                              f"it serves {served[:10]}")

    # -- running -------------------------------------------------------------------------
    def load(self) -> None:
        self._client = self._make_client(timeout=self.timeout_s, retries=self.retries)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="recaption")

    def request_body(self, request: GenRequest) -> dict:
        """The JSON body of one request (chat or completions API)."""
        body: dict = {"model": self.model, "max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if self.temperature > 0:
            body["seed"] = request.seed
            if self.top_p < 1.0:
                body["top_p"] = self.top_p
        if self.uses_chat:
            body["messages"] = chat_messages(request)
        else:
            body["prompt"] = request.prompt
        return body

    def _one(self, request: GenRequest) -> Generation:
        import openai

        try:
            body = self.request_body(request)
        except Exception as e:  # noqa: BLE001 - e.g. an image no converter can read
            return Generation(error=f"bad input: {short_error(e)}")
        try:
            if self.uses_chat:
                resp = self._client.chat.completions.create(**body)
                text = resp.choices[0].message.content
            else:
                resp = self._client.completions.create(**body)
                text = resp.choices[0].text
        except openai.APITimeoutError:
            return Generation(error=f"timeout: no answer within {self.timeout_s:g} s "
                                    f"({self.retries + 1} attempt(s))")
        except openai.APIStatusError as e:
            return Generation(error=f"http {e.status_code}: {short_error(e)}")
        except openai.APIConnectionError as e:
            return Generation(error=f"connection: {short_error(e)}")
        except Exception as e:  # noqa: BLE001 - a response we cannot read is that sample's error
            return Generation(error=f"malformed response: {short_error(e)}")
        if text is not None and not isinstance(text, str):
            return Generation(error=f"malformed response: content is {type(text).__name__}, not text")
        return Generation(text=text)

    def generate(self, requests: Sequence[GenRequest]) -> list[Generation]:
        if self._pool is None:
            self.load()
        return list(self._pool.map(self._one, requests))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
