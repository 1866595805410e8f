"""The tiny local model: its tokenizer, pre-training pass, special tokens and chat template."""

import fnmatch
import json
from importlib.resources import files

import pytest
import torch
from tokenizers import Tokenizer
from setuptools.config.pyprojecttoml import read_configuration
from transformers import AutoModelForCausalLM, AutoTokenizer

from brandcopy.tiny import QWEN25_CHAT_TEMPLATE, PretrainSettings, build_tiny_model
from conftest import REPO


def test_tokenizer_ids_survive_autotokenizer_reload(tiny_model_dir):
    text = "清晨第一步：5%烟酰胺精华，30ml 199元。It's 2024, apply 2-3 drops!\n\n  新品上市"
    saved = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))  # the pipeline build_tiny_model trained
    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)

    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    assert reloaded(text)["input_ids"] == saved.encode(text).ids
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.convert_ids_to_tokens(reloaded("<|im_start|>user<|im_end|>")["input_ids"])[0] == "<|im_start|>"


def test_pretraining_learns_the_text_and_keeps_the_saved_model_plain(tmp_path):
    from conftest import tiny_corpus

    texts = tiny_corpus()[:40]
    settings = PretrainSettings(texts, steps=40, block_size=32, batch_size=4, lr=3e-3)
    random_dir = build_tiny_model(tmp_path / "random", texts)
    trained_dir = build_tiny_model(tmp_path / "trained", texts, pretrain=settings)
    report = json.loads((trained_dir / "pretraining.json").read_text())
    assert report["steps"] == 40 and report["last_loss"] < report["first_loss"] - 1.0
    assert not (random_dir / "pretraining.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(trained_dir)
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    losses = {}
    for name, folder in (("random", random_dir), ("trained", trained_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.dtype == torch.bfloat16  # saved as the random model is: same loading path downstream
        with torch.no_grad():
            losses[name] = model.float()(input_ids=ids, labels=ids).loss.item()
    assert losses["trained"] < losses["random"] - 1.0
    with pytest.raises(ValueError, match="fewer than one block"):
        build_tiny_model(tmp_path / "short", texts, pretrain=PretrainSettings(["短"], block_size=32))


def test_tiny_model_ships_qwen25_instruct_special_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)


def test_chat_template_renders_exactly_like_qwen25_instruct(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    conversation = [{"role": "user", "content": "写一句补水文案"}, {"role": "assistant", "content": "水润一整天。"}]
    with_system = [{"role": "system", "content": "你是品牌文案助手。"}] + conversation

    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n写一句补水文案<|im_end|>\n"
        "<|im_start|>assistant\n水润一整天。<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n写一句补水文案<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(with_system[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n你是品牌文案助手。<|im_end|>\n<|im_start|>user\n写一句补水文案<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_is_package_data(tiny_model_dir):
    template = files("brandcopy").joinpath("templates", "qwen2.5-instruct.jinja")
    package_data = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch("templates/qwen2.5-instruct.jinja", p) for p in package_data["brandcopy"])  # in the wheel
    assert template.read_text(encoding="utf-8") == QWEN25_CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template == QWEN25_CHAT_TEMPLATE
