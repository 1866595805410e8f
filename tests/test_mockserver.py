"""The scripted OpenAI-compatible server speaks the protocol and injects each fault as specified."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import openai
import pytest

from brandcopy.mockserver import FAULT_KINDS, Faults, ScriptedServer


@pytest.fixture
def server():
    with ScriptedServer(faults=Faults(timeout_seconds=2.0)) as running:
        yield running


def _client(server, timeout=5.0):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=timeout)


def _ask(client, content="你好", **kwargs):
    return client.chat.completions.create(model="mock", messages=[{"role": "user", "content": content}], **kwargs)


def test_answers_plain_and_streamed(server):
    client = _client(server)
    answer = _ask(client, "介绍一下屏障修护")
    assert answer.choices[0].message.content == "收到：介绍一下屏障修护"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == len("收到：介绍一下屏障修护")
    chunks = list(_ask(client, "一段很长的话" * 10, stream=True, stream_options={"include_usage": True}))
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == "收到：" + "一段很长的话" * 10
    assert len(chunks) > 3  # really streamed in pieces
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)
    assert [model.id for model in client.models.list()] == ["mock"]


def test_script_replays_in_order_then_responder_answers():
    with ScriptedServer(script=["第一条", "第二条"], responder=lambda body: "默认") as server:
        client = _client(server)
        assert [_ask(client).choices[0].message.content for _ in range(3)] == ["第一条", "第二条", "默认"]


def test_responder_hook_gets_the_request_body():
    def judge(body):
        return json.dumps({"score": 4, "model": body["model"], "n": len(body["messages"])})

    with ScriptedServer(responder=judge) as server:
        answer = _ask(_client(server)).choices[0].message.content
    assert json.loads(answer) == {"score": 4, "model": "mock", "n": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_each_scripted_fault(stream):
    script = [{"fault": kind, "text": "完整的一句回答"} for kind in ("malformed", "length", "empty")]
    with ScriptedServer(script=script) as server:
        client = _client(server)
        with pytest.raises(json.JSONDecodeError):
            response = _ask(client, stream=stream)
            list(response) if stream else None
        if stream:
            chunks = list(_ask(client, stream=True))
            assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == "完整的"
            assert chunks[-1].choices[0].finish_reason == "length"
            assert all(chunk.choices == [] for chunk in _ask(client, stream=True))
        else:
            cut = _ask(client)
            assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == "完整的"
            assert _ask(client).choices == []


def test_http_faults_and_timeouts():
    script = [{"fault": "rate_limit"}, {"fault": "server_error"}, {"fault": "timeout"}, {"fault": "slow", "text": "慢"}]
    with ScriptedServer(script=script, faults=Faults(retry_after=0.25, timeout_seconds=2.0, slow_seconds=0.2)) as server:
        url = server.url + "/chat/completions"
        body = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}
        limited = httpx2.post(url, json=body)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "0.25"
        assert httpx2.post(url, json=body).status_code == 500
        with pytest.raises(openai.APITimeoutError):
            _ask(_client(server, timeout=0.5))
        assert _ask(_client(server, timeout=1.5)).choices[0].message.content == "慢"


def test_random_faults_are_seeded_and_near_the_rate():
    def draw(seed):
        server = ScriptedServer(faults=Faults(rate=0.3), seed=seed)
        bodies = [{"model": "m", "messages": [{"role": "user", "content": str(i)}]} for i in range(2000)]
        return [server._draw_fault(body) for body in bodies]

    first = draw(7)
    assert first == draw(7)
    assert first != draw(8)
    rate = sum(fault is not None for fault in first) / len(first)
    assert 0.26 < rate < 0.34
    assert set(first) - {None} == set(FAULT_KINDS)


def test_rejects_unknown_model_and_wrong_key():
    with ScriptedServer(models=("mock",), api_key="right-key") as server:
        with pytest.raises(openai.AuthenticationError):
            _ask(_client(server))
        good_key = openai.OpenAI(base_url=server.url, api_key="right-key", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            good_key.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
        assert _ask(good_key).choices[0].message.content == "收到：你好"


def test_unknown_fault_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown fault kinds"):
        Faults(kinds=("rate_limit", "meteor"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_mock_command_serves_until_interrupted(signum):
    """Stops cleanly on Ctrl-C and on SIGTERM, also when started with SIGINT ignored (a background job of a script)."""
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "brandcopy.cli", "data", "serve-mock", "--port", "0", "--brand", ""]
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731 - what `cmd &` in a script does
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, text=True, preexec_fn=ignore_sigint,
                               env=os.environ | {"PYTHONPATH": str(repo)})
    try:
        url = process.stdout.readline().split()[-4]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
        assert client.chat.completions.create(model="any", messages=[{"role": "user", "content": "在吗"}]).choices[0].message.content == "收到：在吗"
        process.send_signal(signum)
        assert process.wait(10) == 0
    finally:
        process.kill()  # whatever happened above, no server is left running
        process.wait()


# --- the test doubles stay out of production code ---------------------------------------------------

PRODUCTION = ("datagen", "judge", "rewards", "evaluate", "improve", "train/grpo", "llm", "lint", "metrics")


def _imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


@pytest.mark.parametrize("module", PRODUCTION)
def test_production_modules_never_import_the_scripted_server(module):
    path = Path(__file__).resolve().parents[1] / "brandcopy" / f"{module}.py"
    assert "brandcopy.mockserver" not in _imported_modules(path)


def test_the_judge_loads_without_metrics_or_torch():
    code = "import sys, brandcopy.judge; print(sorted({'torch', 'brandcopy.metrics'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                            env=os.environ | {"PYTHONPATH": str(root)})
    assert result.stdout.strip() == "[]"
