"""Streaming chat, driven non-interactively: adapters switch on one base and stream the same text as generate."""

import os
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.brand import load_brand  # noqa: E402
from brandcopy.chat import chat_loop, load_chat_model, run_adapters  # noqa: E402
from brandcopy.generation import GenerationParams, generate_batch  # noqa: E402
from brandcopy.prompts import chat_messages  # noqa: E402
from brandcopy.modeling import LoraSettings, fix_special_tokens, load_adapter_model, load_model  # noqa: E402
from brandcopy.run import StageInputError  # noqa: E402

GREEDY = GenerationParams(max_new_tokens=8)


def _adapter(tiny_model_dir, path, seed):
    model, tokenizer = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=4, alpha=8))
    fix_special_tokens(model, tokenizer)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"brand_a": _adapter(tiny_model_dir, root / "brand_a", 1), "brand_b": _adapter(tiny_model_dir, root / "brand_b", 2)}


def _reader(lines):
    """``input`` stand-in: the given lines, then end of input."""
    pending = iter(lines)

    def read(prompt):
        line = next(pending, None)
        if line is None:
            raise EOFError
        return line

    return read


def _expected(model, tokenizer, messages):
    return generate_batch(model, tokenizer, [messages], GREEDY, batch_size=1)[0].text


def test_adapters_switch_without_reloading_and_stream_what_generate_returns(tiny_model_dir, adapters):
    brand = load_brand("yuansu")
    model, tokenizer = load_chat_model(tiny_model_dir, adapters, backend="hf")
    base_weights = model.get_base_model().model.embed_tokens.weight
    lines = ["/adapter brand_a", "精华怎么用", "/adapter brand_b", "精华怎么用", "/adapter base", "精华怎么用", "/adapter nope", "/adapters", "/exit"]
    shown = []
    state = chat_loop(model, tokenizer, brand, read=_reader(lines), write=shown.append, params=GREEDY)

    assert model.get_base_model().model.embed_tokens.weight is base_weights  # one base, never reloaded
    assert state.adapter == "base" and state.messages[0]["role"] == "system"
    replies = [m["content"] for m in state.messages if m["role"] == "assistant"]
    assert len(replies) == 3 and len(set(replies)) == 3  # each adapter (and the base) answers differently
    turns = [state.messages[: 2 + 2 * i] for i in range(3)]  # the conversation before each reply
    for path, reply, messages in zip([adapters["brand_a"], adapters["brand_b"]], replies, turns):
        alone, alone_tokenizer = load_adapter_model(path, backend="hf")
        assert reply == _expected(alone, alone_tokenizer, messages)
    base, base_tokenizer = load_model(tiny_model_dir, backend="hf")
    fix_special_tokens(base, base_tokenizer)
    assert replies[2] == _expected(base, base_tokenizer, turns[2])
    text = "".join(shown)
    assert "没有名为「nope」的适配器" in text and "*base" in text
    assert text.count("[brand_a] 助手：") == 1 and text.count("[base] 助手：") == 1  # replies are labelled
    assert len(shown) > 3 * 2  # replies arrived in pieces, not as one block each


def test_latest_stage_is_active_and_ctrl_d_ends_on_a_new_line(tiny_model_dir, adapters):
    model, tokenizer = load_chat_model(tiny_model_dir, adapters, backend="hf")
    shown = []
    state = chat_loop(model, tokenizer, load_brand("yuansu"), read=_reader([]), write=shown.append, params=GREEDY)
    assert state.adapter == "brand_b"  # the last one given: for a run, the latest finished stage
    assert shown[-1] == "\n"


def test_ctrl_c_stops_the_reply_not_the_chat(tiny_model_dir, adapters):
    model, tokenizer = load_chat_model(tiny_model_dir, {"brand_a": adapters["brand_a"]}, backend="hf")
    shown, pieces = [], []
    params = GenerationParams(max_new_tokens=200)  # long enough to be still generating when interrupted

    def write(text):
        shown.append(text)
        if text not in ("\n",) and "助手" not in text and "[" not in text and len(pieces) < 2:
            pieces.append(text)
            if len(pieces) == 2:
                raise KeyboardInterrupt  # what Ctrl-C raises in the main thread mid-reply

    threads = threading.active_count()
    state = chat_loop(model, tokenizer, load_brand("yuansu"), read=_reader(["精华怎么用", "再写一条"]), write=write,
                      params=params)
    assert "\n[已停止这条回复]\n" in shown
    replies = [m["content"] for m in state.messages if m["role"] == "assistant"]
    assert len(replies) == 2 and replies[0] == "".join(pieces).strip()  # the stopped reply keeps what was shown
    assert threading.active_count() == threads  # the generation thread was stopped and joined


def test_write_sends_the_training_prompt_of_the_chosen_product_and_type(tiny_model_dir, adapters):
    brand = load_brand("yuansu")
    product, content_type = sorted(brand.products)[0], "paid_ad_cta"
    model, tokenizer = load_chat_model(tiny_model_dir, {"brand_a": adapters["brand_a"]}, backend="hf")
    shown = []
    lines = ["/write", "/product NOPE", f"/product {product}", f"/type {content_type}", "/write"]
    state = chat_loop(model, tokenizer, brand, read=_reader(lines), write=shown.append, params=GREEDY)
    text = "".join(shown)
    assert "先用 /product 和 /type" in text and "没有编号为「NOPE」的产品" in text
    assert state.messages[:2] == chat_messages(brand, product, content_type)  # the same prompt as training
    alone, alone_tokenizer = load_adapter_model(adapters["brand_a"], backend="hf")
    assert state.messages[2]["content"] == _expected(alone, alone_tokenizer, state.messages[:2])


@pytest.mark.cpu_only
def test_chat_without_config_picks_the_cpu_preset_and_fails_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from brandcopy.cli import app

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    (tmp_path / "configs").symlink_to(repo / "configs")
    (tmp_path / "data" / "brands").symlink_to(repo / "data" / "brands")
    monkeypatch.chdir(tmp_path)  # a checkout where the tiny model was never built
    result = CliRunner().invoke(app, ["chat"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "tiny-model" in lines[0]


def test_reset_forgets_the_conversation(tiny_model_dir, adapters):
    model, tokenizer = load_chat_model(tiny_model_dir, {"brand_a": adapters["brand_a"]}, backend="hf")
    state = chat_loop(model, tokenizer, load_brand("yuansu"), read=_reader(["你好"]), write=lambda t: None, params=GREEDY)
    assert len(state.messages) == 3
    state = chat_loop(model, tokenizer, load_brand("yuansu"), read=_reader(["你好", "/reset"]), write=lambda t: None,
                      params=GREEDY)
    assert len(state.messages) == 1


def test_run_adapters_names_the_missing_stage(tmp_path, adapters):
    assert run_adapters(tmp_path, [str(adapters["brand_a"])]) == {"brand_a": adapters["brand_a"]}
    assert run_adapters(tmp_path, []) == {}
    with pytest.raises(StageInputError, match="dpo"):
        run_adapters(tmp_path, ["dpo"])


def _read_until(proc, marker: str, seen: dict, timeout: float = 600) -> str:
    """Read the process's output until ``marker`` appears after the previous marker's match.

    ``seen`` holds the bytes read so far and the position after the last match: one read can bring
    several markers at once ("[已停止这条回复]" and the next prompt), so the search must not start at
    the end of what was read. Bytes are decoded as a whole, so a character split across reads is whole.
    """
    import select
    import time

    deadline = time.monotonic() + timeout
    while (found := seen["bytes"].decode("utf-8", "replace").find(marker, seen["pos"])) < 0:
        text = seen["bytes"].decode("utf-8", "replace")
        assert time.monotonic() < deadline and proc.poll() is None, f"no {marker!r} in:\n{text[-2000:]}"
        if select.select([proc.stdout], [], [], 1)[0]:
            seen["bytes"] += os.read(proc.stdout.fileno(), 4096)
    seen["pos"] = found + len(marker)
    return seen["bytes"].decode("utf-8", "replace")


@pytest.mark.slow
def test_the_chat_process_survives_ctrl_c_mid_reply_and_ends_cleanly_on_ctrl_d(tiny_model_dir, tmp_path):
    """The real command in a child process: SIGINT (what Ctrl-C sends) during a reply stops the reply, the chat
    goes on, and end of input ends it with status 0, no traceback and no abort from a running thread."""
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-u", "-m", "brandcopy.cli", "chat", "--config", str(repo / "configs" / "tiny-cpu.yaml"),
               "--base", str(tiny_model_dir), "--run", str(tmp_path / "no-run")]
    proc = subprocess.Popen(command, cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # CI ignores SIGINT
    seen = {"bytes": b"", "pos": 0}
    try:
        _read_until(proc, "你：", seen)
        proc.stdin.write("精华怎么用\n".encode())
        proc.stdin.flush()
        _read_until(proc, "助手：", seen)
        proc.send_signal(signal.SIGINT)
        _read_until(proc, "[已停止这条回复]", seen)
        _read_until(proc, "你：", seen)
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    output = (seen["bytes"] + proc.stdout.read()).decode("utf-8", "replace")
    assert "Traceback" not in output and "terminate called" not in output and "kernels-community" not in output
    assert output.endswith("\n")
