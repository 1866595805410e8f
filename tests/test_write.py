"""Brand-gated writing: candidates from a served or local model, lint + fact check, the best clean one or the reasons."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_healthy
from typer.testing import CliRunner

from brandcopy import write
from brandcopy.brand import BrandDataError, load_brand, load_golden
from brandcopy.cli import app
from brandcopy.datagen import insert_banned
from brandcopy.generation import GenerationParams
from brandcopy.llm import LLMClient, LLMConfig
from brandcopy.mockserver import ScriptedServer

PRESET = REPO / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


@pytest.fixture(scope="module")
def two_pairs(brand):
    """Two golden (product, content type) pairs and their golden copy."""
    golden = load_golden(brand)
    return golden[0], next(g for g in golden if g["product_id"] != golden[0]["product_id"])


def scripted_writer(brand, good: dict):
    """An endpoint whose model writes, for ``good``'s prompt, a banned-word draft then the golden copy
    then another bad draft; for every other prompt only banned-word drafts."""
    seen = Counter()

    def respond(body):
        user = body["messages"][-1]["content"]
        seen[user] += 1
        bad = insert_banned(brand, {"text": "这款产品很好用。"}, random.Random(seen[user]))
        return good["text"] if good["instruction"] == user and seen[user] == 2 else bad

    return respond


def test_write_returns_the_clean_candidate_and_never_a_failing_one(tmp_path, brand, two_pairs):
    good, other = two_pairs
    requests = [write.single_request(brand, good["product_id"], good["content_type"]),
                write.single_request(brand, other["product_id"], other["content_type"])]
    with ScriptedServer(responder=scripted_writer(brand, good)) as server:
        client = LLMClient(LLMConfig(model="copy-model", base_url=server.url, api_key_env=None, cache_dir=None, concurrency=1))
        results = write.write_copy(brand, requests, tmp_path / "out", n=3, client=client)
    passed, failed = results
    assert passed.status == "passed" and passed.text == good["text"] and passed.candidates[0].clean
    assert sum(c.clean for c in passed.candidates) == 1 and len(passed.candidates) == 3
    assert failed.status == "failed" and failed.text is None and not any(c.clean for c in failed.candidates)
    assert any(reason.startswith("forbidden_word") for reason in failed.reasons)
    assert all(reason.endswith("/3 篇）") for reason in failed.reasons)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["status"] for r in records] == ["passed", "failed"] and records[1]["text"] is None
    markdown = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert good["text"] in markdown and "**未通过**" in markdown and "（1/2 条通过" in markdown


def test_clean_candidates_are_ranked_by_reward_when_scored(brand, two_pairs):
    good, _ = two_pairs
    request = write.single_request(brand, good["product_id"], good["content_type"])
    clean, cut = write.grade(brand, request, write.Draft(good["text"])), write.grade(brand, request, write.Draft("短", False))
    assert clean.clean and clean.lint_score == 1.0
    assert {v["kind"] for v in cut.violations} >= {"length", write.TRUNCATED} and not cut.clean
    low, high = write.Candidate("甲", [], 1.0, reward=0.2), write.Candidate("乙", [], 1.0, reward=0.9)
    chosen = write.choose(request, [cut, low, high], "reward_model")
    assert chosen.text == "乙" and [c.text for c in chosen.candidates] == ["乙", "甲", "短"]
    unscored = write.choose(request, [cut, write.Candidate("甲", [], 1.0), write.Candidate("乙", [], 1.0)], "lint_score")
    assert unscored.text == "甲"  # equal lint scores keep the sampling order


def test_bad_request_files_name_file_line_and_field(tmp_path, brand):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"product_id": "YS-001", "content_type": "paid_ad_fab"}\n{"content_type": "paid_ad_fab"}\n', encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"r.jsonl:2: field 'product_id'"):
        write.read_requests(jsonl, brand)
    table = tmp_path / "r.csv"
    table.write_text("product_id,content_type\nYS-001,paid_ad_fab\nYS-001,poem\n", encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"r.csv:3: field 'content_type': unknown content_type 'poem'"):
        write.read_requests(table, brand)
    table.write_text("id,product_id,content_type\na,YS-001,paid_ad_fab\nb,YS-002,paid_ad_cta\n", encoding="utf-8")
    assert [(r.id, r.product_id) for r in write.read_requests(table, brand)] == [("a", "YS-001"), ("b", "YS-002")]
    result = CliRunner().invoke(app, ["write", "--config", str(PRESET), "--requests", str(jsonl), f"output_root={tmp_path}"])
    assert result.exit_code == 2 and "r.jsonl:2: field 'product_id'" in result.output
    assert not (tmp_path / "tiny" / "write").exists()


def test_write_with_the_local_tiny_model_reports_why_nothing_passed(tmp_path, brand, tiny_model_dir):
    """A random 2-layer model cannot write brand copy: every candidate fails and the request says why."""
    params = GenerationParams("write", max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95)
    requests = [write.single_request(brand, "YS-001", "paid_ad_fab")]
    [result] = write.write_copy(brand, requests, tmp_path / "out", n=3, model_dir=tiny_model_dir, params=params,
                                load_options={"backend": "hf", "load_in_4bit": False, "max_seq_length": 1024})
    assert result.status == "failed" and result.text is None and len(result.candidates) == 3
    assert any(reason.startswith("length") for reason in result.reasons)
    assert len({c.text for c in result.candidates}) > 1  # sampled: the candidates differ


@pytest.mark.slow
def test_write_through_transformers_serve_on_localhost(tmp_path, tiny_model_dir):
    """The CPU serving route: ``transformers serve`` of a model folder bound to 127.0.0.1, and
    ``brandcopy write --base-url`` writing through it. The tiny model never stops within the budget,
    so every candidate is refused as cut off and the request fails with that reason, no text."""
    merged = tmp_path / "merged"
    merged.symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(merged),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        args = ["write", "--config", str(PRESET), "--product", "YS-001", "--type", "paid_ad_cta", "-n", "2",
                "--max-new-tokens", "8", "--base-url", f"http://127.0.0.1:{port}/v1", "--api-model", str(merged),
                "--api-key-env", "", "--out", str(tmp_path / "write"), f"output_root={tmp_path}"]
        result = CliRunner().invoke(app, args)
    finally:
        server.kill()
        server.wait()
    assert result.exit_code == 1, result.output
    assert "YS-001/paid_ad_cta: failed" in result.output
    [record] = [json.loads(line) for line in (tmp_path / "write" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert record["text"] is None and len(record["candidates"]) == 2
    assert all(c["violations"][0]["kind"] == write.REQUEST_FAILED for c in record["candidates"])
    assert "finish_reason=length" in record["reasons"][0]
    assert len((tmp_path / "write" / "endpoint" / "failures.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_chat_streams_from_a_served_model(brand):
    """``brandcopy chat --base-url``: the conversation (brand system prompt first) goes to the endpoint
    and its streamed answer is shown and kept in the history."""
    from brandcopy.chat import ServedModel, chat_loop

    bodies = []

    def respond(body):
        bodies.append(body)
        return f"第{len(bodies)}条回复：温和清洁，不紧绷。"

    lines = ["写一句洁面乳的文案", "再来一句"]

    def read(prompt):
        if not lines:
            raise EOFError
        return lines.pop(0)

    shown = []
    with ScriptedServer(responder=respond) as server:
        state = chat_loop(ServedModel(server.url, "merged"), None, brand, read=read,
                          write=shown.append, params=GenerationParams("chat", 64, True, 0.7, 0.9))
    assert all(body["stream"] for body in bodies) and bodies[0]["messages"][0]["role"] == "system"
    assert bodies[1]["messages"][2] == {"role": "assistant", "content": "第1条回复：温和清洁，不紧绷。"}
    assert "第2条回复：温和清洁，不紧绷。" in "".join(shown)
    assert [m["role"] for m in state.messages] == ["system", "user", "assistant", "user", "assistant"]
