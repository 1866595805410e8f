"""The project's scripted OpenAI-compatible server: canned answers and injected faults.

It speaks ``POST /v1/chat/completions`` (plain JSON and ``stream=True`` server-sent events) and
``GET /v1/models``, listens on 127.0.0.1 (an ephemeral port by default) in a background thread,
and answers each request from a script (a list of answers, replayed in order) or a responder
function of the request body. Tests use it to inject faults; the demo and the notebooks use it,
with ``datagen.golden_responder``, when no real endpoint is configured.

Faults are drawn per request and per attempt from a seeded RNG keyed by the request body, so the
same requests get the same faults whatever order they arrive in.
"""

import asyncio
import hashlib
import itertools
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from brandcopy.llm import PrefixIndex

FAULT_KINDS = ("rate_limit", "server_error", "slow", "timeout", "malformed", "length", "empty")

Responder = Callable[[dict], str]


@dataclass
class Faults:
    """Which faults to inject and how often.

    Attributes:
        rate: Probability that one attempt gets a fault.
        kinds: Fault kinds to draw from, uniformly (a subset of ``FAULT_KINDS``).
        retry_after: Seconds sent in a 429's Retry-After header.
        slow_seconds: Extra latency of a ``slow`` answer (still within the client's timeout).
        timeout_seconds: How long a ``timeout`` answer sleeps; set it past the client's timeout.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    retry_after: float = 0.05
    slow_seconds: float = 0.5
    timeout_seconds: float = 30.0

    def __post_init__(self):
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


def echo_responder(body: dict) -> str:
    """Answers with the last user message, prefixed; the default responder."""
    user = [message["content"] for message in body["messages"] if message["role"] == "user"]
    return "收到：" + (user[-1] if user else "")


class ScriptedServer:
    """An OpenAI-compatible server in a background thread.

    Example::

        with ScriptedServer(script=["答案一", "答案二"]) as server:
            config = LLMConfig(model="mock", base_url=server.url, api_key_env=None)

    Args:
        responder: ``responder(request_body) -> answer text``; default ``echo_responder``.
        script: Answers replayed in order, one per request: a string, or a dict
            ``{"text": ..., "fault": kind}`` to script a fault exactly. When it runs out the
            responder answers.
        faults: Random fault injection (off by default).
        latency: Seconds every answer waits before it is sent.
        seed: Seed of the fault RNG.
        models: Model names served; a request for another gets 404. None accepts any name.
        api_key: When set, requests must send it as a bearer token (else 401).
        host: Interface to listen on.
        port: Port; 0 picks a free one.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        script: list | None = None,
        faults: Faults | None = None,
        latency: float = 0.0,
        seed: int = 0,
        models: tuple[str, ...] | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.responder = responder or echo_responder
        self.script = list(script or [])
        self.faults = faults or Faults()
        self.latency = latency
        self.seed = seed
        self.models = models
        self.api_key = api_key
        self.host, self.port = host, port
        self.stats = Counter()
        self._seen = Counter()
        self._prompts = PrefixIndex()  # a provider's prompt cache: prefixes of earlier prompts are "cached"
        self._ids = itertools.count(1)
        self._loop = None
        self._thread = None
        self._runner = None

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client, e.g. ``http://127.0.0.1:41234/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ScriptedServer":
        """Starts serving in a daemon thread and returns once the port is bound."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="scripted-server")
        self._thread.start()
        ready.wait(10)
        if self._runner is None:
            raise RuntimeError(f"scripted server failed to start on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        """Stops the server and its thread."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        # handler_cancellation: a client that timed out stops its sleeping handler; short shutdown.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # the port the OS picked for port=0
        self._runner = runner
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "invalid api key", "authentication_error")
        names = self.models or ("mock",)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "brandcopy"} for name in names]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        if not self._authorized(request):
            return _error(401, "invalid api key", "authentication_error")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON", "invalid_request_error")
        if self.models is not None and body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "model_not_found")
        text, fault = self._next_answer(body)
        self.stats[fault or "answered"] += 1
        await asyncio.sleep(self.latency)
        if fault in ("rate_limit", "server_error"):
            return _http_fault(fault, self.faults.retry_after)
        if fault == "slow":
            await asyncio.sleep(self.faults.slow_seconds)
        if fault == "timeout":
            await asyncio.sleep(self.faults.timeout_seconds)
        if body.get("stream"):
            return await self._stream(request, body, text, fault)
        return self._json_answer(body, text, fault)

    def _authorized(self, request: web.Request) -> bool:
        """Whether the request carries the key (always, when the server has none); /models checks it too, as OpenAI's does."""
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _next_answer(self, body: dict) -> tuple[str, str | None]:
        """Returns (text, fault or None) for this request."""
        if self.script:
            entry = self.script.pop(0)
            return (entry, None) if isinstance(entry, str) else (entry.get("text", ""), entry.get("fault"))
        return self.responder(body), self._draw_fault(body)

    def _draw_fault(self, body: dict) -> str | None:
        """Seeded by (seed, request body, attempt number of this body): order-independent."""
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        self._seen[digest] += 1
        rng = random.Random(f"{self.seed}:{digest}:{self._seen[digest]}")
        if rng.random() >= self.faults.rate:
            return None
        return rng.choice(self.faults.kinds)

    def _json_answer(self, body: dict, text: str, fault: str | None) -> web.Response:
        if fault == "malformed":
            return web.Response(text='{"id": "chatcmpl-broken", "choices": [{"message": {"content": "半', content_type="application/json")
        completion = self._completion(body, text, fault)
        if fault == "empty":
            completion["choices"] = []
        return web.json_response(completion)

    def _completion(self, body: dict, text: str, fault: str | None) -> dict:
        finish_reason = "length" if fault == "length" else "stop"
        text = text[: max(1, len(text) // 2)] if fault == "length" else text
        return {
            "id": f"chatcmpl-mock-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "mock"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
            "usage": self._usage(body, text),
        }

    async def _stream(self, request: web.Request, body: dict, text: str, fault: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        base = {"id": f"chatcmpl-mock-{next(self._ids)}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.get("model", "mock")}
        if fault == "malformed":
            await response.write(b'data: {"id": "chatcmpl-broken", "choices": [\n\n')
        elif fault != "empty":
            text = text[: max(1, len(text) // 2)] if fault == "length" else text
            for start in range(0, len(text), 16):
                delta = {"role": "assistant", "content": text[start : start + 16]}
                await _send_event(response, base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            finish = {"index": 0, "delta": {}, "finish_reason": "length" if fault == "length" else "stop"}
            await _send_event(response, base | {"choices": [finish]})
        if body.get("stream_options", {}).get("include_usage"):
            await _send_event(response, base | {"choices": [], "usage": self._usage(body, text)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


    def _usage(self, body: dict, text: str) -> dict:
        """Token counts approximated by characters (the mock has no tokenizer), with OpenAI's
        ``prompt_tokens_details.cached_tokens``: the prompt's prefix shared with an earlier prompt."""
        prompt = sum(len(message["content"]) for message in body["messages"])
        cached = min(prompt, self._prompts.add("".join(message["content"] for message in body["messages"])))
        return {"prompt_tokens": prompt, "completion_tokens": len(text), "total_tokens": prompt + len(text),
                "prompt_tokens_details": {"cached_tokens": cached}}


async def _send_event(response: web.StreamResponse, payload: dict) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8"))


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _http_fault(fault: str, retry_after: float) -> web.Response:
    if fault == "rate_limit":
        response = _error(429, "rate limited (scripted fault)", "rate_limit_error")
        response.headers["Retry-After"] = str(retry_after)
        return response
    return _error(500, "internal error (scripted fault)", "server_error")


def serve(server: ScriptedServer) -> None:
    """Runs a server in the foreground until SIGINT (Ctrl-C) or SIGTERM (the ``brandcopy data serve-mock`` command).

    Both signals get explicit handlers: a background job of a non-interactive shell starts with
    SIGINT ignored, and would otherwise never stop on it.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"scripted OpenAI-compatible server at {server.url} (Ctrl-C stops it)", flush=True)
    try:
        while not stop.wait(0.2):  # a timed wait: the handler runs between two waits at the latest
            pass
    finally:
        server.stop()


def improve_responder(brand):
    """A responder for ``improve.improve_messages``: the judge-and-improve step without an API.

    A sample that lint finds clean is judged good. Any other is judged bad, and the improved text
    is the brand's golden copy of that (product, content type); a pair the golden set lacks gets
    an "improved" text that lint rejects, so the request ends in the failures file after its
    repairs, as a judge that cannot fix the copy would. Repair turns get the same answer.

    Returns:
        ``responder(request_body) -> answer text`` (strict JSON, as the prompt asks).
    """
    from brandcopy.brand import load_golden  # imported here: mockserver stays free of the library otherwise
    from brandcopy.improve import CANDIDATE_BLOCK, HEADER, lint_problems

    golden = {(r["product_id"], r["content_type"]): r["text"] for r in load_golden(brand)}

    def respond(body: dict) -> str:
        first = next(m["content"] for m in body["messages"] if m["role"] == "user")
        product_id, content_type = HEADER.search(first).groups()
        text = CANDIDATE_BLOCK.search(first).group(1)
        problems = lint_problems(brand, text, content_type, product_id)
        if not problems:
            return json.dumps({"verdict": "good", "reasons": ["规则检查通过，结构与语气合格"], "improved": ""}, ensure_ascii=False)
        improved = golden.get((product_id, content_type), "（示例服务器没有这类范文）")
        reasons = [p.split("（")[0] for p in problems[:3]]
        return json.dumps({"verdict": "bad", "reasons": reasons, "improved": improved}, ensure_ascii=False)

    return respond
