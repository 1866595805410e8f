"""An async OpenAI-compatible client and a resumable, fault-tolerant request runner.

One client serves DeepSeek, OpenAI, vLLM, SGLang, ``transformers serve`` and the project's own
scripted server (``mockserver.py``): only ``base_url``, ``model`` and the NAME of the environment
variable that holds the key change. The key itself is read from the environment when a client is
built and is never stored in the config, logged or written to a file.

Retry policy (we own it; the SDK's own retries are off):
- 429, 5xx, timeouts, connection errors, malformed bodies and responses with no choices are
  retried with exponential backoff and full jitter; a 429's ``Retry-After`` is honoured.
- ``finish_reason == "length"`` (the answer hit ``max_tokens``) is retried like a transient fault,
  because a sampled answer is often shorter the next time; when every attempt is cut off the
  request is recorded as a failure with that reason. A truncated answer is never written as data.
- 401/403 (bad key) and 404 (unknown model or path) abort the run with ``LLMFatalError``: every
  other request would fail the same way. Other 4xx are recorded as the request's failure.

``run_requests`` appends each finished result to a JSONL file (one ``os.write`` per line, then
``fsync``), so a killed run loses at most the requests in flight and a rerun skips finished keys.
A request that finally fails goes to the failures file with its reason; nothing is ever replaced
by placeholder text.
"""

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx2
import openai
from openai.types.chat import ChatCompletion

from brandcopy.display import progress_bar

logger = logging.getLogger(__name__)


class LLMError(Exception):
    """A request failed for good; the message is the reason recorded in the failures file."""


class LLMFatalError(LLMError):
    """The endpoint cannot serve any request (unreachable, key rejected, model unknown)."""


class LLMConfigError(ValueError):
    """The client configuration cannot work (for example the key variable is not set)."""


class _Retry(Exception):
    """A transient fault: retry after backoff (or after ``retry_after`` seconds when given)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class LLMConfig:
    """Where to send requests and how hard to try.

    Attributes:
        model: Model name the server expects (for ``transformers serve``: the exact path it was
            started with).
        base_url: OpenAI-compatible endpoint, e.g. ``https://api.deepseek.com`` or
            ``http://127.0.0.1:8000/v1``.
        api_key_env: NAME of the environment variable holding the key; None for a local server
            that needs no key. The key is never stored here.
        concurrency: Requests in flight at once.
        timeout: Seconds one attempt may take, streaming included.
        max_retries: Retries after the first attempt for transient faults.
        backoff_base: First backoff ceiling in seconds; doubles per retry (full jitter).
        backoff_cap: Largest backoff ceiling in seconds.
        temperature: Default sampling temperature (a request's params override it).
        max_tokens: Default answer budget in tokens (a request's params override it).
        stream: Use ``stream=True`` (SSE) and assemble the chunks.
        cache_dir: Directory of the on-disk response cache; None disables it.
        price_input_per_m: Price of one million prompt tokens (DeepSeek list price in USD,
            cache miss, late 2025; set your provider's).
        price_output_per_m: Price of one million completion tokens.
    """

    model: str = "deepseek-chat"
    base_url: str = "https://api.deepseek.com"
    api_key_env: str | None = "DEEPSEEK_API_KEY"
    concurrency: int = 16
    timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    temperature: float = 0.8
    max_tokens: int = 1024
    stream: bool = False
    cache_dir: str | None = "outputs/llm-cache"
    price_input_per_m: float = 0.28
    price_output_per_m: float = 0.42


@dataclass
class Request:
    """One chat request. ``key`` identifies it in the output files; ``meta`` is copied to its record."""

    key: str
    messages: list[dict]
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Completion:
    """One successful answer."""

    text: str
    finish_reason: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    cached: bool = False


@dataclass
class Usage:
    """Running totals for one client. Cache hits cost nothing and are counted apart."""

    calls: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost(self, config: LLMConfig) -> float:
        """Returns the price of the tokens used so far."""
        return (self.prompt_tokens * config.price_input_per_m + self.completion_tokens * config.price_output_per_m) / 1e6


@dataclass
class RunSummary:
    """What one ``run_requests`` call did."""

    produced: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)
    cost: float = 0.0


def resolve_api_key(config: LLMConfig) -> str:
    """Reads the key from the environment variable the config names.

    Raises:
        LLMConfigError: The variable is not set or empty.
    """
    if config.api_key_env is None:
        return "EMPTY"  # local servers (vLLM, transformers serve, mockserver) accept any key
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise LLMConfigError(
            f"environment variable {config.api_key_env} is not set: export it with your API key for "
            f"{config.base_url}, or set api_key_env to the variable that holds it (None for a local server)"
        )
    return key


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """Returns the sha256 of (model, messages, params), the cache's key."""
    blob = json.dumps([model, messages, params], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LLMClient:
    """Async chat client with retries, an on-disk cache and usage totals.

    Use it as ``async with client:`` around calls to ``complete``; ``run_requests`` does this.
    The underlying ``AsyncOpenAI`` is created on entry so that each event loop gets its own
    connection pool (notebooks run each call in a fresh loop).
    """

    def __init__(self, config: LLMConfig):
        self.config = config
        self.usage = Usage()
        self._api_key = resolve_api_key(config)
        self._api = None
        self._checked = False
        self._check_lock = None
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"LLMClient(model={self.config.model!r}, base_url={self.config.base_url!r}, key from ${self.config.api_key_env})"

    async def __aenter__(self):
        self._api = openai.AsyncOpenAI(
            base_url=self.config.base_url, api_key=self._api_key, max_retries=0, timeout=self.config.timeout
        )
        self._check_lock = asyncio.Lock()
        return self

    async def __aexit__(self, *exc_info):
        await self._api.close()
        self._api = None

    async def complete(self, messages: list[dict], params: dict | None = None) -> Completion:
        """Answers one chat request, from the cache when possible.

        Args:
            messages: OpenAI chat messages.
            params: Sampling parameters overriding the config's (``model`` picks another model).

        Returns:
            The answer with its token usage and the number of attempts it took.

        Raises:
            LLMFatalError: The endpoint cannot serve any request.
            LLMError: This request failed after all retries, or the server refused it.
        """
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens} | (params or {})
        model = params.pop("model", self.config.model)
        key = cache_key(model, messages, params)
        hit = self._cache_get(key)
        if hit is not None:
            self.usage.cached += 1
            return hit
        await self._ensure_reachable()
        completion = await self._complete_with_retries(model, messages, params)
        self._cache_put(key, completion)
        return completion

    async def _complete_with_retries(self, model: str, messages: list[dict], params: dict) -> Completion:
        last = None
        for attempt in range(self.config.max_retries + 1):
            if last is not None:
                self.usage.retries += 1
                await asyncio.sleep(self._backoff(attempt, last.retry_after))
            try:
                completion = await asyncio.wait_for(self._call(model, messages, params), self.config.timeout)
            except (_Retry, TimeoutError, openai.APIError, httpx2.HTTPError, json.JSONDecodeError) as exc:
                last = self._classify(exc, model)
                logger.debug("attempt %d failed: %s", attempt + 1, last)
                continue
            completion.attempts = attempt + 1
            self.usage.calls += 1
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += completion.completion_tokens
            return completion
        self.usage.failures += 1
        raise LLMError(f"gave up after {self.config.max_retries + 1} attempts: {last}")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]; at least Retry-After."""
        ceiling = min(self.config.backoff_cap, self.config.backoff_base * 2 ** (attempt - 1))
        delay = self._rng.uniform(0, ceiling)
        return delay if retry_after is None else max(delay, retry_after)

    def _classify(self, exc: Exception, model: str) -> _Retry:
        """Turns an exception into a retryable fault, or raises the final error."""
        if isinstance(exc, _Retry):
            return exc
        if isinstance(exc, (TimeoutError, openai.APITimeoutError)):
            return _Retry(f"timeout after {self.config.timeout}s")
        if isinstance(exc, (openai.APIConnectionError, httpx2.HTTPError)):
            return _Retry(f"connection error: {exc}")
        if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
            return _Retry(f"malformed response: {exc}")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            raise LLMFatalError(
                f"{self.config.base_url} rejected the key from ${self.config.api_key_env} ({exc.status_code})"
            ) from None
        if isinstance(exc, openai.NotFoundError):
            raise LLMFatalError(f"{self.config.base_url} does not serve model {model!r}: {exc.message}") from None
        if isinstance(exc, openai.RateLimitError):
            return _Retry(f"429 rate limited: {exc.message}", _retry_after(exc.response))
        if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
            return _Retry(f"{exc.status_code} server error: {exc.message}")
        if isinstance(exc, openai.APIStatusError):
            self.usage.failures += 1
            raise LLMError(f"{exc.status_code} refused: {exc.message}") from None
        return _Retry(f"API error: {exc}")  # e.g. an error event inside a stream

    async def _call(self, model: str, messages: list[dict], params: dict) -> Completion:
        if self.config.stream:
            return await self._call_stream(model, messages, params)
        response = await self._api.chat.completions.create(model=model, messages=messages, **params)
        if not isinstance(response, ChatCompletion):
            raise _Retry(f"malformed response: not a chat completion: {str(response)[:200]!r}")
        if not response.choices:
            raise _Retry("malformed response: no choices")
        choice = response.choices[0]
        text = choice.message.content if choice.message is not None else None
        usage = response.usage
        return _finish(
            text,
            choice.finish_reason,
            response.model or model,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    async def _call_stream(self, model: str, messages: list[dict], params: dict) -> Completion:
        stream = await self._api.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **params
        )
        parts, finish_reason, usage, saw_choice = [], None, None, False
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                saw_choice = True
                parts.append(choice.delta.content or "")
                finish_reason = choice.finish_reason or finish_reason
        if not saw_choice:
            raise _Retry("malformed response: stream had no choices")
        return _finish(
            "".join(parts),
            finish_reason,
            model,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    async def _ensure_reachable(self) -> None:
        """Before the first network call: checks that the server answers and accepts the key."""
        async with self._check_lock:
            if self._checked:
                return
            for attempt in range(self.config.max_retries + 1):
                try:
                    await asyncio.wait_for(self._api.models.list(), self.config.timeout)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                    raise LLMFatalError(
                        f"{self.config.base_url} rejected the key from ${self.config.api_key_env} ({exc.status_code})"
                    ) from None
                except openai.APIStatusError:
                    break  # some servers have no /models; the server did answer
                except (TimeoutError, openai.APIConnectionError, httpx2.HTTPError) as exc:
                    if attempt == self.config.max_retries:
                        raise LLMFatalError(f"cannot reach {self.config.base_url}: {exc or type(exc).__name__}") from None
                    await asyncio.sleep(self._backoff(attempt + 1, None))
                    continue
                break
            self._checked = True

    def _cache_path(self, key: str) -> Path:
        return Path(self.config.cache_dir) / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> Completion | None:
        if self.config.cache_dir is None:
            return None
        path = self._cache_path(key)
        if not path.exists():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return Completion(**record | {"cached": True, "attempts": 0})

    def _cache_put(self, key: str, completion: Completion) -> None:
        if self.config.cache_dir is None:
            return
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{self._rng.getrandbits(32):08x}.tmp")
        tmp.write_text(json.dumps(asdict(completion), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)  # atomic: readers see the whole entry or none


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds from a Retry-After header (numeric form), or None."""
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # the HTTP-date form: fall back to our own backoff


def _finish(text: str | None, finish_reason: str | None, model: str, prompt_tokens: int, completion_tokens: int) -> Completion:
    """Validates an answer's content and finish reason, raising ``_Retry`` for the bad ones."""
    if finish_reason == "length":
        raise _Retry(f"finish_reason=length: answer cut off at max_tokens ({completion_tokens} tokens)")
    if text is None or not text.strip():
        raise _Retry(f"malformed response: empty content (finish_reason={finish_reason})")
    return Completion(text, finish_reason or "stop", model, prompt_tokens, completion_tokens)


# --- resumable JSONL ---------------------------------------------------------------------------


def read_jsonl_records(path: str | Path) -> list[dict]:
    """Reads a results file written by ``run_requests``, repairing a torn last line.

    A run killed mid-write can leave a last line without its newline; that line is cut off the
    file (its request simply runs again). Any other unreadable line is an error.

    Raises:
        ValueError: A complete line is not a JSON object with a ``key``, naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "key" not in record:
            raise ValueError(f"{path}:{number}: field 'key' is missing")
        records.append(record)
    return records


class JsonlAppender:
    """Appends one JSON object per line with a single write each, then fsyncs."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # regular files write whole; a short write is finished, not dropped
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    """Writes records to a temp file next to ``path`` and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _compact_failures(path: Path, done: set[str]) -> None:
    """Keeps the latest failure per key and drops keys that have since been produced."""
    if not path.exists():
        return
    latest = {record["key"]: record for record in read_jsonl_records(path)}
    write_jsonl_atomic(path, [record for key, record in latest.items() if key not in done])


# --- the runner --------------------------------------------------------------------------------

Validate = Callable[[Request, str], str | None]
Repair = Callable[[Request, str, str], list[dict]]


def run_requests(
    client: LLMClient,
    requests: Iterable[Request],
    out_path: str | Path,
    failures_path: str | Path,
    validate: Validate | None = None,
    repair: Repair | None = None,
    max_repairs: int = 2,
    desc: str = "requests",
) -> RunSummary:
    """Runs requests concurrently and appends each result to ``out_path`` as it finishes.

    Keys already in ``out_path`` are skipped, so a rerun after a crash or Ctrl-C continues where
    the last run stopped and a finished rerun costs nothing. Keys in ``failures_path`` are tried
    again. Works inside a running event loop (Jupyter) by running in a worker thread.

    Args:
        client: The client (not yet entered).
        requests: Requests with unique keys.
        out_path: Results JSONL: ``key``, ``text``, ``meta``, ``model``, ``finish_reason``, token
            counts, ``attempts``, ``repairs``, ``cached``.
        failures_path: Failures JSONL: ``key``, ``reason``, ``meta`` and the last invalid
            ``text`` when validation rejected it.
        validate: ``validate(request, text)`` returns None for a good answer or the problem.
        repair: ``repair(request, text, problem)`` returns the messages of a repair request;
            without it a rejected answer goes straight to failures.
        max_repairs: Repair rounds before a rejected answer goes to failures.
        desc: Progress bar label.

    Returns:
        Counts, elapsed seconds, token usage and cost of this call.

    Raises:
        LLMFatalError: The endpoint cannot serve requests; finished results stay on disk.
        ValueError: Duplicate request keys, or an unreadable line in an existing output file.
    """
    coro = arun_requests(client, requests, out_path, failures_path, validate, repair, max_repairs, desc)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a notebook's loop is already running
        return pool.submit(asyncio.run, coro).result()


async def arun_requests(
    client: LLMClient,
    requests: Iterable[Request],
    out_path: str | Path,
    failures_path: str | Path,
    validate: Validate | None = None,
    repair: Repair | None = None,
    max_repairs: int = 2,
    desc: str = "requests",
) -> RunSummary:
    """The async body of ``run_requests``; same arguments and result."""
    requests = list(requests)
    _check_unique_keys(requests)
    out_path, failures_path = Path(out_path), Path(failures_path)
    done = {record["key"] for record in read_jsonl_records(out_path)}
    _compact_failures(failures_path, done)
    pending = iter([request for request in requests if request.key not in done])
    summary = RunSummary(skipped=sum(request.key in done for request in requests))
    start, usage_before = time.perf_counter(), asdict(client.usage)
    out, failures = JsonlAppender(out_path), JsonlAppender(failures_path)
    bar = progress_bar(len(requests), desc, initial=summary.skipped, unit="req")
    try:
        async with client:
            workers = [
                asyncio.create_task(_worker(client, pending, out, failures, validate, repair, max_repairs, summary, bar))
                for _ in range(client.config.concurrency)
            ]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        bar.close()
        out.close()
        failures.close()
        _compact_failures(failures_path, {record["key"] for record in read_jsonl_records(out_path)})
        summary.seconds = time.perf_counter() - start
        summary.usage = {name: value - usage_before[name] for name, value in asdict(client.usage).items()}
        summary.cost = Usage(**summary.usage).cost(client.config)
        logger.info("%s: %s", desc, summary)
    return summary


def _check_unique_keys(requests: list[Request]) -> None:
    seen = set()
    for request in requests:
        if request.key in seen:
            raise ValueError(f"duplicate request key {request.key!r}")
        seen.add(request.key)


async def _worker(client, pending, out, failures, validate, repair, max_repairs, summary, bar) -> None:
    for request in pending:  # one shared iterator: each request goes to exactly one worker
        record, failed = await _answer(client, request, validate, repair, max_repairs)
        (failures if failed else out).write(record)
        summary.failed += failed
        summary.produced += not failed
        bar.update(1)


async def _answer(client, request, validate, repair, max_repairs) -> tuple[dict, bool]:
    """Returns (record, failed) for one request, running the repair loop when a validator rejects."""
    messages = request.messages
    for repairs in range(max_repairs + 1):
        try:
            completion = await client.complete(messages, request.params)
        except LLMFatalError:
            raise
        except LLMError as exc:
            return {"key": request.key, "reason": str(exc), "meta": request.meta}, True
        problem = validate(request, completion.text) if validate else None
        if problem is None:
            return _result_record(request, completion, repairs), False
        if repair is None:
            break
        if repairs < max_repairs:
            messages = repair(request, completion.text, problem)
    reason = f"rejected after {repairs} repairs: {problem}"
    return {"key": request.key, "reason": reason, "meta": request.meta, "text": completion.text}, True


def _result_record(request: Request, completion: Completion, repairs: int) -> dict:
    return {
        "key": request.key,
        "text": completion.text,
        "meta": request.meta,
        "model": completion.model,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "attempts": completion.attempts,
        "repairs": repairs,
        "cached": completion.cached,
    }
