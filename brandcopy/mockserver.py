"""The project's scripted OpenAI-compatible server: canned answers and injected faults.

It speaks ``POST /v1/chat/completions`` (plain JSON and ``stream=True`` server-sent events) and
``GET /v1/models``, listens on 127.0.0.1 (an ephemeral port by default) in a background thread,
and answers each request from a script (a list of answers, replayed in order) or a responder
function of the request body. Tests use it to inject faults; the demo, the CLI and the notebooks
use it, with ``scripted_responder``, when no real endpoint is configured.

Every test double of the project lives here: the server, the scripted answers to datagen,
improve and judge prompts (``scripted_responder``, ``improve_responder``, ``judge_responder``)
and ``endpoint``, the one place that reads the ``scripted`` base URL. Production modules receive
an ``LLMConfig`` and never import this module.

Faults are drawn per request and per attempt from a seeded RNG keyed by the request body, so the
same requests get the same faults whatever order they arrive in.
"""

import asyncio
import dataclasses
import hashlib
import itertools
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web

from brandcopy.llm import LLMConfig, PrefixIndex

SCRIPTED = "scripted"  # a preset's base_url that asks the wiring for the scripted server (read only by ``endpoint``)
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


# --- scripted answers for the demo, the CLI and the notebooks (no API) ------------------------------


@contextmanager
def endpoint(config: LLMConfig, brand) -> Iterator[LLMConfig]:
    """Yields ``config`` unchanged, or, when its ``base_url`` is ``scripted``, the same config pointed at
    a scripted server answering for ``brand`` (``scripted_responder``) while the block runs.

    The one place a stage's endpoint may become the scripted server: the CLI, the demo and the
    notebooks wrap a stage in it, e.g.
    ``with endpoint(evaluate.judge_endpoint(cfg), brand) as judge: run_eval(cfg, judge)``.
    The scripted server needs no key and its answers are not cached.
    """
    if config.base_url != SCRIPTED:
        yield config
        return
    with ScriptedServer(responder=scripted_responder(brand)) as server:
        yield dataclasses.replace(config, base_url=server.url, api_key_env=None, cache_dir=None)


def improve_responder(brand) -> Responder:
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


# Openers of a scripted persona rewrite: a first-person voice and a small story, facts untouched.
PERSONA_OPENERS = (
    "我最近一直在用{name}，说说我自己的真实感受。\n",
    "前阵子有位读者问我{name}到底怎么样，我认真用了一段时间，今天来回答她。\n",
    "我身边好几个朋友都在问{name}，我先自己试了一阵子。\n",
)
PERSONA_SHARE = 0.5  # share of persona rewrite requests the scripted server rewrites; the rest come back unchanged


def persona_rewrite(brand, product_id: str, content_type: str, text: str, rng: random.Random) -> str:
    """A first-person opener put in front of ``text``, or ``text`` unchanged when every opener would
    add a lint violation (the text is already at its length limit) or the draw skips it.

    The cleaning stage's persona pass thus sees both answers on CPU: accepted rewrites (about
    ``PERSONA_SHARE`` of them) and unchanged texts that fail its check.
    """
    from brandcopy.lint import lint_text  # imported here: mockserver stays free of the library otherwise

    if rng.random() >= PERSONA_SHARE:
        return text
    before = lint_text(brand, text, content_type, product_id).kinds()
    name = brand.product(product_id).name
    for opener in rng.sample(PERSONA_OPENERS, len(PERSONA_OPENERS)):
        rewritten = opener.format(name=name) + text
        if lint_text(brand, rewritten, content_type, product_id).kinds() <= before:
            return rewritten
    return text


def scripted_responder(brand, seed: int = 0) -> Responder:
    """A ``ScriptedServer`` responder that answers every prompt of the pipeline with realistic brand copy.

    Generation and cleaning prompts get the golden copy of their (product, content type); a pair
    the golden set lacks gets a one-line note that lint rejects (too short), so it ends in the
    failures file instead of passing another product's copy off as this one's. Persona rewrites get
    a first-person opener in front of the original for a seeded share of requests
    (``persona_rewrite``), the original unchanged otherwise. Exaggerated and fake negative prompts
    get the offline negative of the quoted text; the weak prompt gets a bland one-liner;
    judge-and-improve prompts get ``improve_responder``'s answer; judge prompts get
    ``judge_responder``'s; anything else gets the last user message echoed.
    """
    from brandcopy import prompts  # imported here: mockserver stays free of the library otherwise
    from brandcopy.brand import load_golden
    from brandcopy.datagen import alter_fact, foreign_materials, insert_banned, swap_material
    from brandcopy.improve import IMPROVE_TASK

    by_pair = {(r["product_id"], r["content_type"]): r["text"] for r in load_golden(brand)}
    names = {p.name: p for p in brand.products.values()}
    improve, judge = improve_responder(brand), judge_responder(brand)
    persona_task = prompts.CLEAN_PASSES["persona"][0]

    def respond(body: dict) -> str:
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        header = re.search(r"任务：(\S+)\n产品编号：(\S+)\n文案类型：(\S+)", users[0])
        if header is None:
            if _JUDGE_PROMPT.search(users[-1]):
                return judge(body)
            weak = re.match(r"写一段「(.+)」的", users[-1])
            return f"这款{names[weak.group(1)].name}挺好用的，推荐试试。" if weak else "收到：" + users[-1]
        task, product_id, content_type = header.groups()
        if task == IMPROVE_TASK:
            return improve(body)
        source = re.search(r"【原文】\n(.*)\n【原文结束】", users[0], re.S)
        rng = random.Random(f"{seed}:{users[-1]}")
        sample = {"product_id": product_id, "content_type": content_type, "text": source.group(1) if source else ""}
        if task == persona_task:
            return persona_rewrite(brand, product_id, content_type, sample["text"], rng)
        if task == prompts.EXAGGERATED:
            return insert_banned(brand, sample, rng)
        if task == prompts.FAKE:
            foreign = foreign_materials(brand, brand.product(product_id))
            fallback = f"另含{foreign[0]}。" if foreign else "（示例服务器无法植入事实错误）"
            return swap_material(brand, sample, rng) or alter_fact(brand, sample, rng) or sample["text"] + fallback
        return by_pair.get((product_id, content_type), f"（示例服务器没有{product_id}的这类范文）")

    return respond


# --- the scripted judge: reads judge.py's prompts back and scores with lint ------------------------

_JUDGE_PROMPT = re.compile(r"【待评文案】|【候选 [A-Z]】")
_SINGLE_TEXT = re.compile(r"【待评文案】\n(.*?)\n【待评文案结束】", re.S)
_CANDIDATE = re.compile(r"【候选 ([A-Z])】\n(.*?)\n【候选 \1 结束】", re.S)
_PRODUCT_ID = re.compile(r"^产品编号：(\S+)$", re.M)
_CONTENT_TYPE = re.compile(r"^内容类型：([a-z_]+)（", re.M)


@dataclass
class JudgePrompt:
    """What a judge prompt asks about, read back from its text (for scripted judges).

    Attributes:
        product_id: Product the copies are about.
        content_type: Their content type.
        candidates: ``(label, text)`` of the best-of candidates in the order shown, or a single
            ``("", text)`` for a single-answer prompt.
    """

    product_id: str
    content_type: str
    candidates: list[tuple[str, str]]

    @property
    def is_best_of(self) -> bool:
        return self.candidates[0][0] != ""


def read_judge_prompt(messages: list[dict]) -> JudgePrompt:
    """Parse a prompt built by ``judge.single_messages`` or ``judge.best_of_messages``.

    Raises:
        ValueError: The messages are not a judge prompt.
    """
    user = messages[-1]["content"]
    product, content_type = _PRODUCT_ID.search(user), _CONTENT_TYPE.search(user)
    single, candidates = _SINGLE_TEXT.search(user), _CANDIDATE.findall(user)
    if not product or not content_type or not (single or candidates):
        raise ValueError(f"not a judge prompt: {user[:120]!r}")
    found = [("", single.group(1))] if single else candidates
    return JudgePrompt(product.group(1), content_type.group(1), found)


def heuristic_scores(brand, text: str, content_type: str, product_id: str) -> dict[str, int]:
    """Deterministic 1-5 scores from the shared grader: lint score, fact check, CTA.

    A stand-in judge for the demo and tests, not a quality measure: it sees only what lint sees.
    """
    from brandcopy.judge import DIMENSIONS  # imported here: mockserver stays free of the library otherwise
    from brandcopy.lint import CTA_KIND, FACT_KINDS, lint_text

    if not text.strip():
        return dict.fromkeys(DIMENSIONS, 1)
    result = lint_text(brand, text, content_type, product_id)
    kinds = result.kinds()
    overall = 1 + round(4 * result.score)
    return {
        "tone": overall,
        "accuracy": 2 if kinds & FACT_KINDS else 5,
        "structure": overall,
        "persuasion": 2 if CTA_KIND in kinds else overall,
        "instruction": overall,
    }


def judge_responder(brand) -> Responder:
    """A ``ScriptedServer`` responder that judges with ``heuristic_scores``.

    Best-of answers pick the highest total score, ties broken by a hash of the text, so the
    verdict does not depend on position or label and the two rounds agree.

    Returns:
        ``responder(request_body) -> answer text`` (strict JSON, as the prompts ask).
    """

    def respond(body: dict) -> str:
        prompt = read_judge_prompt(body["messages"])
        if not prompt.is_best_of:
            scores = heuristic_scores(brand, prompt.candidates[0][1], prompt.content_type, prompt.product_id)
            return json.dumps({**scores, "reason": "按规则检查打分"}, ensure_ascii=False)

        def rank(candidate: tuple[str, str]) -> tuple[int, str]:
            total = sum(heuristic_scores(brand, candidate[1], prompt.content_type, prompt.product_id).values())
            return total, hashlib.sha256(candidate[1].encode("utf-8")).hexdigest()

        label, _ = max(prompt.candidates, key=rank)
        return json.dumps({"best": label, "reason": "规则检查得分最高"}, ensure_ascii=False)

    return respond
