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
- The endpoint is checked once per client before its first answer, cached or not (``GET /models``,
  free): a refused connection fails at once, and a rejected key is never hidden by cache hits.
- A circuit breaker stops the run with ``LLMFatalError`` when the endpoint went away mid-run: no
  request has reached it for ``breaker_seconds`` and at least ``breaker_errors`` attempts in a row
  failed to connect. The answers finished so far stay on disk; the same command resumes.

The response cache is keyed by (endpoint, model, messages, params): answers of one server are
never replayed for another that happens to use the same model name.

``run_requests`` appends each finished result to a JSONL file (one ``os.write`` per line, then
``fsync``), so a killed run loses at most the requests in flight and a rerun skips finished keys.
A request that finally fails goes to the failures file with its reason; nothing is ever replaced
by placeholder text.
"""

import asyncio
import bisect
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
from brandcopy.files import atomic_write_jsonl, atomic_write_text, cut_torn_line, read_jsonl

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
        timeout: Seconds one attempt may take.
        max_retries: Retries after the first attempt for transient faults.
        backoff_base: First backoff ceiling in seconds; doubles per retry (full jitter).
        backoff_cap: Largest backoff ceiling in seconds.
        temperature: Default sampling temperature (a request's params override it).
        max_tokens: Default answer budget in tokens (a request's params override it).
        cache_dir: Directory of the on-disk response cache; None disables it.
        breaker_errors: Connection failures in a row (no answer in between) before the run stops.
        breaker_seconds: How long the endpoint must have been unreachable before the run stops.
        price_input_per_m: Price of one million prompt tokens (DeepSeek list price in USD,
            cache miss, late 2025; set your provider's).
        price_cached_input_per_m: Price of one million prompt tokens the provider served from its
            prompt cache (DeepSeek's cache-hit price; OpenAI bills cached tokens at half or less).
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
    cache_dir: str | None = "outputs/llm-cache"
    price_input_per_m: float = 0.28
    price_cached_input_per_m: float = 0.028
    price_output_per_m: float = 0.42
    breaker_errors: int = 5
    breaker_seconds: float = 10.0

    def __post_init__(self):
        if self.concurrency < 1:
            raise LLMConfigError(f"concurrency must be at least 1, got {self.concurrency} (--concurrency)")


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
    cached_prompt_tokens: int = 0  # prompt tokens the provider's prompt cache served (when it reports them)


@dataclass
class Usage:
    """Running totals for one client. Cache hits cost nothing and are counted apart."""

    calls: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # part of prompt_tokens served by the provider's prompt cache

    def cost(self, config: LLMConfig) -> float:
        """Returns the estimated price of the tokens used so far (cached prompt tokens at their price)."""
        fresh = self.prompt_tokens - self.cached_prompt_tokens
        return (fresh * config.price_input_per_m + self.cached_prompt_tokens * config.price_cached_input_per_m
                + self.completion_tokens * config.price_output_per_m) / 1e6


@dataclass
class RunSummary:
    """What one ``run_requests`` call did."""

    produced: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)
    cost: float = 0.0
    cost_per_sample: float | None = None  # estimated cost / produced (accepted) results of this call


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
            f"environment variable {config.api_key_env} is not set: export {config.api_key_env}=<your key for "
            f"{config.base_url}>, or name the variable that holds it with --api-key-env NAME "
            f"(--api-key-env '' for a local server without a key; in a preset: eval_judge_api_key_env / grpo_judge_api_key_env)"
        )
    return key


def cache_key(base_url: str, model: str, messages: list[dict], params: dict) -> str:
    """Returns the sha256 of (endpoint, model, messages, params), the cache's key."""
    blob = json.dumps([base_url.rstrip("/"), model, messages, params], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LLMClient:
    """Async chat client with retries, an on-disk cache and usage totals.

    Use it as ``async with client:`` around calls to ``complete``; ``run_requests`` does this.
    The underlying ``AsyncOpenAI`` is created on entry so that each event loop gets its own
    connection pool (notebooks run each call in a fresh loop).
    """

    def __init__(self, config: LLMConfig):
        if not config.base_url.startswith(("http://", "https://")):
            raise LLMConfigError(f"base_url {config.base_url!r} is not an http(s) URL (a preset's 'scripted' is served by "
                                 "the CLI, the demo and the notebooks: pass the LLMConfig mockserver.endpoint yields)")
        self.config = config
        self.usage = Usage()
        self._api_key = resolve_api_key(config)
        self._api = None
        self._checked = False
        self._check_lock = None
        self._rng = random.Random()
        self._down_since = None  # the circuit breaker: when connection errors began, and how many in a row
        self._connection_errors = 0

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
        await self._ensure_reachable()  # before any cache hit: a rejected key is never hidden by the cache
        key = cache_key(self.config.base_url, model, messages, params)
        hit = self._cache_get(key)
        if hit is not None:
            self.usage.cached += 1
            return hit
        completion = await self._complete_with_retries(model, messages, params)
        self._cache_put(key, completion)
        return completion

    async def _complete_with_retries(self, model: str, messages: list[dict], params: dict) -> Completion:
        last = last_exc = None
        for attempt in range(self.config.max_retries + 1):
            if last is not None:
                self.usage.retries += 1
                await asyncio.sleep(self._backoff(attempt, last.retry_after))
            sent = time.monotonic()
            try:
                completion = await asyncio.wait_for(self._call(model, messages, params), self.config.timeout)
            except (_Retry, TimeoutError, openai.APIError, httpx2.HTTPError, json.JSONDecodeError) as exc:
                self._track_connection(exc, sent)
                last, last_exc = self._classify(exc, model), exc
                logger.debug("attempt %d failed: %s", attempt + 1, last)
                continue
            self._track_connection(None, sent)
            completion.attempts = attempt + 1
            self.usage.calls += 1
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += completion.completion_tokens
            self.usage.cached_prompt_tokens += completion.cached_prompt_tokens
            return completion
        if _is_connection_error(last_exc) and self._down_since is not None:
            # Retries with short backoffs can run out inside the breaker's window: wait for its verdict, so
            # that no request is written off because the endpoint went away. Trips when still nobody got an
            # answer; when another request did meanwhile, the endpoint is up and this request fails alone.
            await asyncio.sleep(max(0.0, self._down_since + self.config.breaker_seconds - time.monotonic()))
            self._track_connection(last_exc, time.monotonic())
        self.usage.failures += 1
        raise LLMError(f"gave up after {self.config.max_retries + 1} attempts: {last}")

    def _track_connection(self, exc: Exception | None, sent: float) -> None:
        """The circuit breaker: count attempts that could not talk to the server; an answer resets it.

        Only an answer to an attempt sent after the failures began resets it: a server shutting down
        still answers the requests it had already received while it refuses new ones, and those late
        answers say nothing about whether it is up now.

        Args:
            exc: The attempt's error; None when it got an answer.
            sent: When the attempt was sent (``time.monotonic()``).

        Raises:
            LLMFatalError: The endpoint went away (see ``LLMConfig.breaker_errors``/``breaker_seconds``).
        """
        if exc is None or not _is_connection_error(exc):
            if self._down_since is None or sent >= self._down_since:
                self._down_since, self._connection_errors = None, 0  # the server answered (even a 429 or 500)
            return
        now = time.monotonic()
        self._down_since = self._down_since or now
        self._connection_errors += 1
        if self._connection_errors >= self.config.breaker_errors and now - self._down_since >= self.config.breaker_seconds:
            raise LLMFatalError(
                f"the endpoint {self.config.base_url} went away: {self._connection_errors} attempts in a row over "
                f"{now - self._down_since:.0f}s could not connect ({_describe(exc)}). Finished answers are saved; "
                "run the same command again once the endpoint is back to continue where this run stopped"
            ) from None

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
        return _Retry(f"API error: {exc}")

    async def _call(self, model: str, messages: list[dict], params: dict) -> Completion:
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
            cached_tokens(usage),
        )

    async def _ensure_reachable(self) -> None:
        """Before the first answer (cached or not): checks that the server answers and accepts the key.

        A refused connection (nothing listens on that port) fails at once; other connection
        errors and timeouts are retried with backoff.
        """
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
                    if attempt == self.config.max_retries or _refused(exc):
                        raise LLMFatalError(f"cannot reach {self.config.base_url}: {_describe(exc)}") from None
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
        atomic_write_text(self._cache_path(key), json.dumps(asdict(completion), ensure_ascii=False))


def _is_connection_error(exc: BaseException) -> bool:
    """True when an attempt never got an answer from the server (refused, reset, DNS; not a timeout)."""
    return isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)) and not isinstance(
        exc, (openai.APITimeoutError, httpx2.TimeoutException))


def _causes(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _refused(exc: BaseException) -> bool:
    """True when the connection was refused: nothing listens on that host and port."""
    return any(isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower() for e in _causes(exc))


def _describe(exc: BaseException) -> str:
    """A one-line reason for a connection failure: the innermost cause that says something."""
    if _refused(exc):
        return "connection refused: nothing listens there (is the server running?)"
    messages = [str(e) for e in _causes(exc) if str(e)]
    return messages[-1] if messages else type(exc).__name__


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds from a Retry-After header (numeric form), or None."""
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # the HTTP-date form: fall back to our own backoff


def cached_tokens(usage) -> int:
    """Prompt tokens the provider served from its prompt cache, as reported (0 when it does not say).

    OpenAI (and vLLM with ``--enable-prompt-tokens-details``) report
    ``usage.prompt_tokens_details.cached_tokens``; DeepSeek reports ``usage.prompt_cache_hit_tokens``.
    """
    if usage is None:
        return 0
    details = usage.prompt_tokens_details
    if details is not None and details.cached_tokens:
        return details.cached_tokens
    return int((usage.model_extra or {}).get("prompt_cache_hit_tokens") or 0)


def _finish(text: str | None, finish_reason: str | None, model: str, prompt_tokens: int, completion_tokens: int,
            cached_prompt_tokens: int = 0) -> Completion:
    """Validates an answer's content and finish reason, raising ``_Retry`` for the bad ones."""
    if finish_reason == "length":
        raise _Retry(f"finish_reason=length: answer cut off at max_tokens ({completion_tokens} tokens)")
    if text is None or not text.strip():
        raise _Retry(f"malformed response: empty content (finish_reason={finish_reason})")
    return Completion(text, finish_reason or "stop", model, prompt_tokens, completion_tokens,
                      cached_prompt_tokens=cached_prompt_tokens)


# --- resumable JSONL ---------------------------------------------------------------------------


def read_jsonl_records(path: str | Path) -> list[dict]:
    """Reads a results file written by ``run_requests``, repairing a torn last line.

    A run killed mid-write can leave a last line without its newline; that line is cut off the
    file (its request simply runs again). Any other unreadable line is an error.

    Raises:
        DataFileError: A complete line is not a JSON object with a ``key``, naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    torn = cut_torn_line(path)
    if torn:
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, torn)
    return read_jsonl(path, ("key",))


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


def _compact_failures(path: Path, done: set[str]) -> None:
    """Keeps the latest failure per key and drops keys that have since been produced."""
    if not path.exists():
        return
    latest = {record["key"]: record for record in read_jsonl_records(path)}
    atomic_write_jsonl(path, [record for key, record in latest.items() if key not in done])


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
    # delay: no bar for a run that stops at once (a refused connection, a rejected key): the error is the one line.
    bar = progress_bar(len(requests), desc, initial=summary.skipped, unit="req", delay=0.5)
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
        summary.cost_per_sample = summary.cost / summary.produced if summary.produced else None
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
        "cached_prompt_tokens": completion.cached_prompt_tokens,
    }


# --- teacher cost: prompt prefixes shared between requests ------------------------------------


def prompt_text(messages: list[dict]) -> str:
    """The characters a server sees of a chat request, role by role (what a prefix cache matches)."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class PrefixIndex:
    """Prompts seen so far; tells how long a prefix a new prompt shares with any of them.

    The longest common prefix with a set of strings is the one with a lexicographic neighbour,
    so a sorted list and a binary search answer it.
    """

    def __init__(self):
        self._seen: list[str] = []

    def add(self, text: str) -> int:
        """Remembers ``text`` and returns the length of its longest prefix shared with an earlier one."""
        at = bisect.bisect_left(self._seen, text)
        shared = max((_common_prefix(text, self._seen[i]) for i in (at - 1, at) if 0 <= i < len(self._seen)), default=0)
        self._seen.insert(at, text)
        return shared


def shared_prefix_share(requests: Iterable[Request]) -> float:
    """Share of prompt characters that lie in a prefix shared with an earlier request, in send order.

    A provider's prompt cache (DeepSeek, OpenAI) or vLLM's prefix cache can serve exactly these
    characters from an earlier request, so this share bounds what caching saves.

    Args:
        requests: Requests in the order they are sent.

    Returns:
        Shared characters / all prompt characters (0.0 for no requests).
    """
    index, shared, total = PrefixIndex(), 0, 0
    for request in requests:
        text = prompt_text(request.messages)
        shared += index.add(text)
        total += len(text)
    return shared / total if total else 0.0


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cost_report(summaries: Iterable[RunSummary], accepted: int) -> str:
    """One line on what a data step cost: calls, tokens (cached ones apart), estimated cost per accepted sample.

    Args:
        summaries: The step's ``run_requests`` summaries (one per pass for cleaning).
        accepted: Samples the step kept (for cleaning: the clean samples written).

    Returns:
        E.g. ``teacher: 324 calls (0 from the local cache), 812,000 prompt tokens (612,000 cached by
        the provider, 75%), 98,000 completion tokens; estimated $0.1192, $0.00037 per accepted sample (321)``.
    """
    summaries = list(summaries)
    usage = {name: sum(s.usage.get(name, 0) for s in summaries) for name in ("calls", "cached", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")}
    cost = sum(s.cost for s in summaries)
    share = f", {usage['cached_prompt_tokens'] / usage['prompt_tokens']:.0%}" if usage["prompt_tokens"] else ""
    per = f"${cost / accepted:.5f} per accepted sample ({accepted})" if accepted else "no accepted sample"
    return (f"teacher: {usage['calls']} calls ({usage['cached']} from the local cache), {usage['prompt_tokens']:,} prompt tokens "
            f"({usage['cached_prompt_tokens']:,} cached by the provider{share}), {usage['completion_tokens']:,} completion tokens; "
            f"estimated ${cost:.4f}, {per}")
