"""The client's retry policy, cache, resumable output and error handling, against local servers."""

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_healthy

from brandcopy.llm import (
    LLMClient,
    LLMConfig,
    LLMConfigError,
    LLMFatalError,
    Request,
    cached_tokens,
    cost_report,
    prompt_text,
    read_jsonl_records,
    run_requests,
    shared_prefix_share,
)
from brandcopy.mockserver import Faults, ScriptedServer

REPO = Path(__file__).resolve().parents[1]


def fast_config(server, **overrides) -> LLMConfig:
    """Small sleeps and high concurrency so that fault tests run in seconds."""
    values = dict(
        model="mock", base_url=server.url, api_key_env=None, concurrency=64, timeout=1.0,
        max_retries=8, backoff_base=0.01, backoff_cap=0.05, cache_dir=None,
    )
    return LLMConfig(**values | overrides)


def echo_requests(n: int, prefix: str = "问题") -> list[Request]:
    return [Request(f"k{i}", [{"role": "user", "content": f"{prefix}{i}"}], meta={"i": i}) for i in range(n)]


def lines(path: Path) -> list[dict]:
    raw = path.read_text(encoding="utf-8") if path.exists() else ""
    assert raw == "" or raw.endswith("\n"), "torn last line"
    return [json.loads(line) for line in raw.splitlines()]


def test_thousand_requests_with_thirty_percent_faults(tmp_path):
    n = 1000
    faults = Faults(rate=0.3, timeout_seconds=1.5, slow_seconds=0.05, retry_after=0.02)
    with ScriptedServer(faults=faults, seed=3) as server:
        summary = run_requests(
            LLMClient(fast_config(server, timeout=0.5)), echo_requests(n),
            tmp_path / "out.jsonl", tmp_path / "failures.jsonl",
        )
        injected = sum(count for kind, count in server.stats.items() if kind not in ("requests", "answered", "slow"))
    produced, failed = lines(tmp_path / "out.jsonl"), lines(tmp_path / "failures.jsonl")
    keys = [record["key"] for record in produced + failed]
    assert sorted(keys) == sorted(f"k{i}" for i in range(n))  # every key, no duplicates
    assert all(record["text"] == f"收到：问题{record['meta']['i']}" for record in produced)  # no placeholder
    assert injected > 0.2 * n and summary.usage["retries"] >= injected
    assert summary.produced == len(produced) >= 0.995 * n
    assert all(record["reason"] for record in failed)


def test_each_fault_is_retried_and_retry_after_is_honoured(tmp_path):
    kinds = ["rate_limit", "server_error", "timeout", "malformed", "length", "empty"]
    script = [entry for kind in kinds for entry in ({"fault": kind, "text": "半截"}, "好答案")]
    faults = Faults(retry_after=0.3, timeout_seconds=1.0)
    with ScriptedServer(script=script, faults=faults) as server:
        client = LLMClient(fast_config(server, concurrency=1, timeout=0.3))
        start = time.perf_counter()
        run_requests(client, echo_requests(len(kinds)), tmp_path / "out.jsonl", tmp_path / "failures.jsonl")
        elapsed = time.perf_counter() - start
    produced = lines(tmp_path / "out.jsonl")
    assert [record["text"] for record in produced] == ["好答案"] * len(kinds)
    assert [record["attempts"] for record in produced] == [2] * len(kinds)
    assert elapsed >= 0.3 + 0.3  # waited out Retry-After and the timeout; backoff alone is <= 0.05 s


def test_truncated_answers_become_a_failure_never_data(tmp_path):
    with ScriptedServer(script=[{"fault": "length", "text": "被截断的回答"}] * 3) as server:
        summary = run_requests(
            LLMClient(fast_config(server, max_retries=2)), echo_requests(1),
            tmp_path / "out.jsonl", tmp_path / "failures.jsonl",
        )
    assert summary.failed == 1 and lines(tmp_path / "out.jsonl") == []
    [failure] = lines(tmp_path / "failures.jsonl")
    assert failure["key"] == "k0" and "finish_reason=length" in failure["reason"] and "text" not in failure


def test_cache_makes_a_rerun_free(tmp_path):
    with ScriptedServer() as server:
        config = fast_config(server, cache_dir=str(tmp_path / "cache"))
        first = run_requests(LLMClient(config), echo_requests(20), tmp_path / "a.jsonl", tmp_path / "fa.jsonl")
        calls = server.stats["requests"]
        second = run_requests(LLMClient(config), echo_requests(20), tmp_path / "b.jsonl", tmp_path / "fb.jsonl")
        assert server.stats["requests"] == calls  # nothing sent
    assert first.usage["calls"] == 20 and second.usage["calls"] == 0 and second.usage["cached"] == 20
    assert second.cost == 0 < first.cost
    assert sorted(r["text"] for r in lines(tmp_path / "b.jsonl")) == sorted(r["text"] for r in lines(tmp_path / "a.jsonl"))


def test_rerun_skips_done_keys_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "out.jsonl"
    done = {"key": "k0", "text": "早就写好了", "meta": {}}
    out.write_text(json.dumps(done, ensure_ascii=False) + "\n" + '{"key": "k1", "te', encoding="utf-8")
    with ScriptedServer() as server:
        summary = run_requests(LLMClient(fast_config(server)), echo_requests(3), out, tmp_path / "f.jsonl")
        assert server.stats["requests"] == 2
    assert summary.skipped == 1 and summary.produced == 2
    records = lines(out)
    assert sorted(r["key"] for r in records) == ["k0", "k1", "k2"]
    assert records[0]["text"] == "早就写好了"


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: not valid JSON"):
        read_jsonl_records(out)


def test_failures_are_retried_on_rerun_and_leave_the_failures_file(tmp_path):
    with ScriptedServer(script=[{"fault": "server_error"}] * 2 + ["第二次成功"]) as server:
        config = fast_config(server, max_retries=1)
        run_requests(LLMClient(config), echo_requests(1), tmp_path / "o.jsonl", tmp_path / "f.jsonl")
        assert [r["key"] for r in lines(tmp_path / "f.jsonl")] == ["k0"]
        run_requests(LLMClient(config), echo_requests(1), tmp_path / "o.jsonl", tmp_path / "f.jsonl")
    assert [r["text"] for r in lines(tmp_path / "o.jsonl")] == ["第二次成功"]
    assert lines(tmp_path / "f.jsonl") == []


def test_validation_repair_loop(tmp_path):
    def responder(body):
        last = body["messages"][-1]["content"]
        return "修正后的文案" if "请修正" in last and "能修" in body["messages"][0]["content"] else "初稿"

    def validate(request, text):
        return None if "修正" in text else "缺少修正"

    def repair(request, text, problem):
        return request.messages + [{"role": "assistant", "content": text}, {"role": "user", "content": f"请修正：{problem}"}]

    requests = [Request("fixable", [{"role": "user", "content": "能修"}]), Request("hopeless", [{"role": "user", "content": "无解"}])]
    with ScriptedServer(responder=responder) as server:
        run_requests(LLMClient(fast_config(server)), requests, tmp_path / "o.jsonl", tmp_path / "f.jsonl", validate, repair, max_repairs=2)
        assert server.stats["requests"] == 2 + 3  # fixable: draft + 1 repair; hopeless: draft + 2 repairs
    [fixed] = lines(tmp_path / "o.jsonl")
    assert fixed["key"] == "fixable" and fixed["text"] == "修正后的文案" and fixed["repairs"] == 1
    [failed] = lines(tmp_path / "f.jsonl")
    assert failed["key"] == "hopeless" and failed["reason"] == "rejected after 2 repairs: 缺少修正" and failed["text"] == "初稿"


def test_works_inside_a_running_event_loop(tmp_path):
    async def notebook_cell():
        return run_requests(LLMClient(config), echo_requests(3), tmp_path / "o.jsonl", tmp_path / "f.jsonl")

    with ScriptedServer() as server:
        config = fast_config(server)
        summary = asyncio.run(notebook_cell())
    assert summary.produced == 3


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("BRANDCOPY_NO_SUCH_KEY", raising=False)
    with pytest.raises(LLMConfigError, match="BRANDCOPY_NO_SUCH_KEY is not set.*--api-key-env NAME"):
        LLMClient(LLMConfig(api_key_env="BRANDCOPY_NO_SUCH_KEY"))
    with pytest.raises(LLMConfigError, match="concurrency must be at least 1"):
        LLMConfig(concurrency=0)


def test_connection_refused_fails_fast_with_the_default_retries(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    config = LLMConfig(model="mock", base_url=url, api_key_env=None, cache_dir=None)  # 6 retries, 1 s backoff
    start = time.perf_counter()
    with pytest.raises(LLMFatalError, match=rf"cannot reach {url}: connection refused"):
        run_requests(LLMClient(config), echo_requests(3), tmp_path / "o.jsonl", tmp_path / "f.jsonl")
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "o.jsonl").read_text(encoding="utf-8")


def test_server_killed_mid_run_trips_the_breaker_then_the_run_resumes(tmp_path):
    out, failures = tmp_path / "out.jsonl", tmp_path / "failures.jsonl"
    config = dict(concurrency=4, timeout=5.0, max_retries=6, backoff_base=0.2, backoff_cap=1.0, breaker_seconds=1.0)
    server = ScriptedServer(latency=0.02).start()
    port = server.port

    def kill_after_some_answers():
        while not out.exists() or out.read_bytes().count(b"\n") < 10:  # read only: the run is appending
            time.sleep(0.01)
        server.stop()

    killer = threading.Thread(target=kill_after_some_answers, daemon=True)
    killer.start()
    start = time.perf_counter()
    with pytest.raises(LLMFatalError, match="went away.*run the same command again"):
        run_requests(LLMClient(fast_config(server, **config)), echo_requests(300), out, failures)
    assert time.perf_counter() - start < 20
    killer.join(10)
    done = lines(out)
    assert 10 <= len(done) < 300
    assert all(record["text"] == f"收到：问题{record['meta']['i']}" for record in done)  # no placeholder
    assert lines(failures) == []  # no request was written off because the server went away

    with ScriptedServer(port=port) as restarted:  # the same endpoint is back
        summary = run_requests(LLMClient(fast_config(restarted, **config)), echo_requests(300), out, failures)
    assert summary.skipped == len(done) and summary.produced == 300 - len(done)
    assert sorted(record["key"] for record in lines(out)) == sorted(f"k{i}" for i in range(300))


def test_retries_that_run_out_before_the_breaker_window_still_stop_the_run(tmp_path):
    # Backoffs of a millisecond exhaust a request's 3 attempts long before the 1 s window: the request waits
    # for the breaker's verdict instead of being written off as failed.
    out, failures = tmp_path / "out.jsonl", tmp_path / "failures.jsonl"
    config = dict(concurrency=2, timeout=5.0, max_retries=2, backoff_base=0.001, backoff_cap=0.001,
                  breaker_errors=3, breaker_seconds=1.0)
    server = ScriptedServer(latency=0.02).start()

    def kill_after_some_answers():
        while not out.exists() or out.read_bytes().count(b"\n") < 5:
            time.sleep(0.01)
        server.stop()

    killer = threading.Thread(target=kill_after_some_answers, daemon=True)
    killer.start()
    with pytest.raises(LLMFatalError, match="went away"):
        run_requests(LLMClient(fast_config(server, **config)), echo_requests(200), out, failures)
    killer.join(10)
    assert len(lines(out)) >= 5 and lines(failures) == []


def test_late_answers_of_a_server_shutting_down_do_not_reset_the_breaker(tmp_path):
    # A server shutting down refuses new connections but still answers what it had received. The slow answer
    # arrives after another request's retries ran out: it was sent before the outage, so it does not reset the
    # breaker, and the request that ran out is not written off.
    out, failures = tmp_path / "out.jsonl", tmp_path / "failures.jsonl"
    config = dict(concurrency=2, timeout=5.0, max_retries=2, backoff_base=0.001, backoff_cap=0.001,
                  breaker_errors=3, breaker_seconds=1.0)
    server = ScriptedServer(script=[{"text": "收到：慢", "fault": "slow"}], faults=Faults(slow_seconds=0.6)).start()

    def stop_while_the_slow_answer_is_in_flight():
        while not out.exists() or not out.read_bytes().count(b"\n"):
            time.sleep(0.005)
        server.stop()  # waits for the slow answer

    stopper = threading.Thread(target=stop_while_the_slow_answer_is_in_flight, daemon=True)
    stopper.start()
    with pytest.raises(LLMFatalError, match="went away"):
        run_requests(LLMClient(fast_config(server, **config)), echo_requests(50), out, failures)
    stopper.join(10)
    assert "收到：慢" in [record["text"] for record in lines(out)]  # the late answer was kept
    assert lines(failures) == []


def test_cache_is_keyed_by_endpoint_and_never_hides_a_rejected_key(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with ScriptedServer(responder=lambda body: "甲服务器的回答") as first:
        run_requests(LLMClient(fast_config(first, cache_dir=cache)), echo_requests(5), tmp_path / "a.jsonl", tmp_path / "fa.jsonl")
    with ScriptedServer(responder=lambda body: "乙服务器的回答") as second:  # same model name, another server
        summary = run_requests(LLMClient(fast_config(second, cache_dir=cache)), echo_requests(5), tmp_path / "b.jsonl", tmp_path / "fb.jsonl")
    assert summary.usage["cached"] == 0 and {r["text"] for r in lines(tmp_path / "b.jsonl")} == {"乙服务器的回答"}

    monkeypatch.setenv("BRANDCOPY_TEST_KEY", "sk-right")
    with ScriptedServer(api_key="sk-right") as guarded:
        config = fast_config(guarded, cache_dir=cache, api_key_env="BRANDCOPY_TEST_KEY")
        run_requests(LLMClient(config), echo_requests(5), tmp_path / "c.jsonl", tmp_path / "fc.jsonl")
        monkeypatch.setenv("BRANDCOPY_TEST_KEY", "sk-revoked")  # every answer is cached now; the key is bad
        with pytest.raises(LLMFatalError, match=r"rejected the key from \$BRANDCOPY_TEST_KEY \(401\)"):
            run_requests(LLMClient(config), echo_requests(5), tmp_path / "d.jsonl", tmp_path / "fd.jsonl")
        assert guarded.stats["requests"] == 5  # the check is GET /models: no chat request was paid for
    assert not (tmp_path / "d.jsonl").read_text(encoding="utf-8")


def test_unreachable_server_is_fatal_and_keeps_finished_work(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"key": "k0", "text": "已完成"}\n', encoding="utf-8")
    server = ScriptedServer().start()
    url = server.url
    server.stop()  # nothing listens on that port now
    config = LLMConfig(model="mock", base_url=url, api_key_env=None, max_retries=1, backoff_base=0.01, cache_dir=None)
    with pytest.raises(LLMFatalError, match=f"cannot reach {url}"):
        run_requests(LLMClient(config), echo_requests(3), out, tmp_path / "f.jsonl")
    assert lines(out) == [{"key": "k0", "text": "已完成"}]


def test_rejected_model_and_key_are_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANDCOPY_TEST_KEY", "sk-right")
    with ScriptedServer(models=("mock",), api_key="sk-right") as server:
        bad_model = fast_config(server, model="no-such-model", api_key_env="BRANDCOPY_TEST_KEY")
        with pytest.raises(LLMFatalError, match="does not serve model 'no-such-model'"):
            run_requests(LLMClient(bad_model), echo_requests(2), tmp_path / "o.jsonl", tmp_path / "f.jsonl")
        monkeypatch.setenv("BRANDCOPY_TEST_KEY", "sk-wrong")
        with pytest.raises(LLMFatalError, match=r"rejected the key from \$BRANDCOPY_TEST_KEY"):
            run_requests(LLMClient(fast_config(server, api_key_env="BRANDCOPY_TEST_KEY")), echo_requests(2), tmp_path / "o.jsonl", tmp_path / "f.jsonl")


def test_api_key_never_reaches_files_or_logs(tmp_path, monkeypatch, caplog):
    secret = "sk-brandcopy-secret-0123456789"
    monkeypatch.setenv("BRANDCOPY_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    faults = Faults(rate=0.5, kinds=("rate_limit", "server_error", "malformed"), retry_after=0.01)
    with ScriptedServer(api_key=secret, faults=faults) as server:
        config = fast_config(server, api_key_env="BRANDCOPY_TEST_KEY", cache_dir=str(tmp_path / "outputs" / "cache"), max_retries=1)
        client = LLMClient(config)
        run_requests(client, echo_requests(50), tmp_path / "outputs" / "o.jsonl", tmp_path / "outputs" / "f.jsonl")
    written = [path.read_text(encoding="utf-8") for path in (tmp_path / "outputs").rglob("*") if path.is_file()]
    assert len(written) > 10 and lines(tmp_path / "outputs" / "o.jsonl")
    assert not any(secret in text for text in written)
    assert secret not in caplog.text and secret not in repr(client) and secret not in repr(config)


KILL_SCRIPT = """
import sys
from brandcopy.llm import LLMClient, LLMConfig, Request, run_requests
url, out = sys.argv[1], sys.argv[2]
config = LLMConfig(model="mock", base_url=url, api_key_env=None, concurrency=8, timeout=2.0,
                   max_retries=20, backoff_base=0.01, backoff_cap=0.05, cache_dir=out + ".cache")
requests = [Request(f"k{i}", [{"role": "user", "content": f"问题{i}"}]) for i in range(300)]
run_requests(LLMClient(config), requests, out, out + ".failures")
"""


def _line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_at_five_random_points_then_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    kill_points = sorted(random.Random(11).sample(range(10, 290), 5))  # results written when each kill lands
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with ScriptedServer(latency=0.02, faults=Faults(rate=0.2, kinds=("rate_limit", "server_error", "malformed")), seed=5) as server:
        command = [sys.executable, "-c", KILL_SCRIPT, server.url, str(out)]
        sizes = []
        for point in kill_points:
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while _line_count(out) < point and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            sizes.append(_line_count(out))
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    records = lines(out)
    assert all(point <= size < 300 for point, size in zip(kill_points, sizes))  # each kill interrupted a run
    assert sorted(r["key"] for r in records) == sorted(f"k{i}" for i in range(300))
    assert all(r["text"] == "收到：问题" + r["key"][1:] for r in records)


@pytest.mark.slow
def test_transformers_serve(tmp_path, tiny_model_dir):
    """The real protocol: ``transformers serve`` on the tiny model, which must be named by its exact path."""
    from transformers import AutoTokenizer

    [hao] = AutoTokenizer.from_pretrained(tiny_model_dir).encode("好")
    port = free_port()
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(tiny_model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)  # the client fails fast on a refused connection
        config = LLMConfig(model=str(tiny_model_dir), base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None,
                           concurrency=2, timeout=60, max_retries=30, backoff_base=0.5, backoff_cap=1.0, cache_dir=None)
        # A random tiny model rarely ends a turn: bias one token and stop on it, so the answer is known.
        params = {"max_tokens": 20, "logit_bias": {str(hao): 100.0}, "stop": ["好好好"]}
        requests = [Request("a", [{"role": "user", "content": "你好"}], params), Request("b", [{"role": "user", "content": "早上好"}], params)]
        run_requests(LLMClient(config), requests, tmp_path / "o.jsonl", tmp_path / "f.jsonl")
        records = lines(tmp_path / "o.jsonl")
        assert sorted(r["key"] for r in records) == ["a", "b"]
        assert all(r["text"] == "好好好" and r["finish_reason"] == "stop" for r in records)
        assert all(r["completion_tokens"] == 3 for r in records)
        wrong_model = LLMConfig(**vars(config) | {"model": str(tmp_path / "other")})
        summary = run_requests(LLMClient(wrong_model), requests, tmp_path / "w.jsonl", tmp_path / "wf.jsonl")
        assert summary.failed == 2 and all("400 refused" in r["reason"] for r in lines(tmp_path / "wf.jsonl"))
    finally:
        server.kill()
        server.wait()


# --- teacher cost (issue 17): cached prompt tokens, cost per accepted sample ------------------


def test_provider_cached_tokens_are_recorded_and_priced_lower(tmp_path, caplog):
    """Requests sharing a long opening: the server reports the cached part (OpenAI's
    prompt_tokens_details.cached_tokens), the client records it per result and in the summary, and the
    estimated cost bills it at the cached price; a prompt ordered the other way gets no cache hit."""
    shared = "品牌规则与范例。" * 200
    shared_first = [Request(f"a{i}", [{"role": "user", "content": shared + f"产品{i}"}]) for i in range(5)]
    varying_first = [Request(f"b{i}", [{"role": "user", "content": f"产品{i}" + shared}]) for i in range(5)]
    summaries = {}
    for name, requests in (("shared_first", shared_first), ("varying_first", varying_first)):
        with ScriptedServer(responder=lambda body: "短文案") as server:
            summaries[name] = run_requests(LLMClient(fast_config(server, concurrency=1)), requests,
                                           tmp_path / f"{name}.jsonl", tmp_path / f"{name}.failures.jsonl")
    good, bad = summaries["shared_first"], summaries["varying_first"]
    assert good.usage["prompt_tokens"] == bad.usage["prompt_tokens"]
    assert good.usage["cached_prompt_tokens"] >= 4 * len(shared)
    assert bad.usage["cached_prompt_tokens"] < 0.01 * bad.usage["prompt_tokens"]  # only "产品" before the digit
    assert sum(r["cached_prompt_tokens"] for r in lines(tmp_path / "shared_first.jsonl")) == good.usage["cached_prompt_tokens"]
    assert good.cost < 0.5 * bad.cost and good.cost_per_sample == pytest.approx(good.cost / 5)
    report = cost_report([good], good.produced)
    assert "5 calls" in report and f"{good.usage['cached_prompt_tokens']:,} cached by the provider" in report
    assert f"${good.cost / 5:.5f} per accepted sample (5)" in report


def test_cached_tokens_read_deepseek_and_openai_usage():
    from openai.types.completion_usage import CompletionUsage

    openai_style = CompletionUsage.model_validate({"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                                                   "prompt_tokens_details": {"cached_tokens": 64}})
    deepseek_style = CompletionUsage.model_validate({"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                                                     "prompt_cache_hit_tokens": 80, "prompt_cache_miss_tokens": 20})
    plain = CompletionUsage.model_validate({"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105})
    assert [cached_tokens(u) for u in (openai_style, deepseek_style, plain, None)] == [64, 80, 0, 0]


def test_shared_prefix_share_counts_prefixes_of_earlier_requests_only():
    def req(text):
        return Request(text, [{"role": "user", "content": text}])

    header = len(prompt_text([{"role": "user", "content": ""}]))
    total = 3 * (header + 6)
    # "abcdef" shares nothing earlier; "abcxyz" shares <user>abc; "zzzzzz" shares the role marker only
    expected = (0 + header + 3 + header) / total
    assert shared_prefix_share([req("abcdef"), req("abcxyz"), req("zzzzzz")]) == pytest.approx(expected)
    assert shared_prefix_share([]) == 0.0
