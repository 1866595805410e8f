"""Streaming chat, driven non-interactively: adapters switch on one base and stream the same text as generate."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.brand import load_brand  # noqa: E402
from brandcopy.chat import chat_loop, load_chat_model, run_adapters  # noqa: E402
from brandcopy.generation import GenerationParams, generate_batch  # noqa: E402
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
    lines = ["精华怎么用", "/adapter brand_b", "精华怎么用", "/adapter base", "精华怎么用", "/adapter nope", "/adapters", "/exit"]
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
    assert "no adapter 'nope'" in text and "*base" in text
    assert len(shown) > 3 * 2  # replies arrived in pieces, not as one block each


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
