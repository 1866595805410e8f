"""Batched left-padded generation on the tiny model: equal to one-by-one, stops at EOS, in order."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.generation import GenerationParams, _trim_at_eos, generate_batch, render_prompts  # noqa: E402
from brandcopy.modeling import load_model  # noqa: E402

PROMPTS = ["精华", "请为这款修护精华写一篇小红书笔记", "写一条付费广告", "你好", "烟酰胺和神经酰胺有什么区别？请简单说说"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    assert model.dtype == torch.float32  # CPU evaluation in float32
    return model, tokenizer


def _messages(texts):
    return [[{"role": "user", "content": text}] for text in texts]


def test_batched_greedy_equals_one_by_one(tiny):
    model, tokenizer = tiny
    messages = _messages(PROMPTS)
    lengths = {len(tokenizer(p)["input_ids"]) for p in render_prompts(tokenizer, messages)}
    assert len(lengths) > 1  # prompts of different lengths, so the batch is really left-padded
    params = GenerationParams(max_new_tokens=24)
    batched = generate_batch(model, tokenizer, messages, params, batch_size=len(PROMPTS))
    single = [generate_batch(model, tokenizer, [m], params, batch_size=1)[0] for m in messages]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]


def test_results_come_back_in_input_order(tiny):
    model, tokenizer = tiny
    params = GenerationParams(max_new_tokens=6)
    forward = generate_batch(model, tokenizer, _messages(PROMPTS), params, batch_size=2)
    backward = generate_batch(model, tokenizer, _messages(PROMPTS[::-1]), params, batch_size=3)
    assert [g.token_ids for g in forward] == [g.token_ids for g in backward[::-1]]


def test_budget_exhausted_is_not_stopped(tiny):
    model, tokenizer = tiny
    out = generate_batch(model, tokenizer, _messages(PROMPTS[:2]), GenerationParams(max_new_tokens=5), batch_size=2)
    assert all(g.new_tokens == 5 and not g.stopped for g in out)  # the random model never ends its turn


def test_stops_at_end_of_turn(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    head = torch.nn.Linear(model.config.hidden_size, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tokenizer.eos_token_id] = 10.0  # the end-of-turn token always wins
    model.lm_head = head
    out = generate_batch(model, tokenizer, _messages(PROMPTS[:3]), GenerationParams(max_new_tokens=8), batch_size=3)
    assert all(g.stopped and g.token_ids == [tokenizer.eos_token_id] and g.text == "" for g in out)


def test_sampled_setting_repeats_with_its_seed(tiny):
    model, tokenizer = tiny
    params = GenerationParams(name="sampled", max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.95, seed=7)
    first = generate_batch(model, tokenizer, _messages(PROMPTS), params, batch_size=5)
    second = generate_batch(model, tokenizer, _messages(PROMPTS), params, batch_size=5)
    other = generate_batch(model, tokenizer, _messages(PROMPTS), GenerationParams(**{**params.__dict__, "seed": 8}), 5)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_trim_drops_padding_after_end_of_turn():
    assert _trim_at_eos([5, 6, 2, 0, 0], eos_id=2) == ([5, 6, 2], True)
    assert _trim_at_eos([5, 6, 7], eos_id=2) == ([5, 6, 7], False)


def test_describe_lists_only_the_parameters_in_use():
    assert GenerationParams(max_new_tokens=64).describe() == "greedy: max_new_tokens=64, do_sample=False"
    sampled = GenerationParams(name="sampled", max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9, seed=1)
    assert sampled.describe() == "sampled: max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9, seed=1"


def test_missing_pad_token_is_a_clear_error(tiny):
    model, tokenizer = tiny
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        with pytest.raises(ValueError, match="pad token"):
            generate_batch(model, tokenizer, _messages(PROMPTS[:1]), GenerationParams(max_new_tokens=2))
    finally:
        tokenizer.pad_token = pad
