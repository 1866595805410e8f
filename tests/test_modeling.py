"""brandcopy.modeling: loading on both backends, the EOS/pad/template fix and its check."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from tokenizers import pre_tokenizers
from transformers import DataCollatorForLanguageModeling, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from trl import SFTConfig, SFTTrainer

from brandcopy.backend import resolve_backend
from brandcopy import modeling
from brandcopy.tiny import QWEN25_CHAT_TEMPLATE
from brandcopy.modeling import (
    LoraSettings,
    TrainingExampleError,
    check_training_example,
    fix_special_tokens,
    load_adapter_model,
    load_model,
)

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = ["写一句补水文案", "写一句温和文案", "写一句清爽文案", "写一句提亮文案",
           "写一句修护文案", "写一句控油文案", "写一句敏感肌文案", "写一句促销文案"]
ANSWERS = ["水润一整天。", "温和不刺激。", "清爽不油腻。", "提亮肤色。",
           "修护屏障。", "控油又保湿。", "敏感肌可用。", "限时第二件半价。"]
CONVERSATIONS = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in zip(PROMPTS, ANSWERS)]


# --- the seed bug and its fix ----------------------------------------------------------------------


def _memorise_and_count_stops(model, tokenizer, steps: int = 80) -> int:
    """Train on the 8 conversations with transformers' collator, then count greedy generations that end."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # masks pad ids in the labels
    rows = [{"input_ids": tokenizer.apply_chat_template(c, return_dict=True)["input_ids"]} for c in CONVERSATIONS]
    batch = collator(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    stops = 0
    for conversation in CONVERSATIONS:
        prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        completion = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        stops += tokenizer.convert_tokens_to_ids("<|im_end|>") in completion.tolist()
    return stops


def test_pad_equal_eos_never_learns_to_stop_and_fix_special_tokens_cures_it(tiny_model_dir):
    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    tokenizer.pad_token = tokenizer.eos_token  # the seed's setting
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    assert _memorise_and_count_stops(model, tokenizer) == 0

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    tokenizer.pad_token = tokenizer.eos_token
    changes = fix_special_tokens(model, tokenizer)
    assert changes["pad_token"] == ("<|im_end|>", "<|endoftext|>")
    assert _memorise_and_count_stops(model, tokenizer) >= 7


def test_fix_special_tokens_is_idempotent_and_syncs_model(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    original = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]

    changes = fix_special_tokens(model, tokenizer)
    assert "chat_template" in changes and modeling.has_generation_markers(tokenizer.chat_template)
    assert fix_special_tokens(model, tokenizer) == {}
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, pad)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (eos, pad)
    # generation_config keeps the model's own stop list (Qwen2.5-Instruct ships [<|im_end|>, <|endoftext|>])
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == ([eos, pad], pad)
    assert [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS] == original


def test_fix_special_tokens_adds_pad_when_no_spare_token_exists():
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1} | {c: i + 2 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

    changes = fix_special_tokens(model, tokenizer)

    assert changes["pad_token"] == ("<|im_end|>", "<|pad|>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(vocab) + 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert fix_special_tokens(model, tokenizer) == {}


def test_fix_special_tokens_rejects_unknown_template_without_markers(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        fix_special_tokens(model, tokenizer)


# --- check_training_example -------------------------------------------------------------------


def test_check_training_example_shows_trained_tokens_and_catches_masked_eos(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    example = {"messages": CONVERSATIONS[0]}
    with pytest.raises(TrainingExampleError, match="carries no loss"):
        check_training_example(tokenizer, example)  # shipped template: no generation markers

    fix_special_tokens(model, tokenizer)
    report = check_training_example(tokenizer, example)
    assert report.trained_text == "水润一整天。<|im_end|>\n"
    assert "[[水润一整天。<|im_end|>\n]]" in str(report)

    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(TrainingExampleError, match="pad_token == eos_token"):
        check_training_example(tokenizer, example)


def test_check_training_example_catches_training_inference_mismatch(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, backend="hf")
    fix_special_tokens(model, tokenizer)
    # A template whose generation prompt differs from how assistant turns are rendered in training.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}",
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n\\n' }}",
    )
    with pytest.raises(TrainingExampleError, match="render this conversation differently"):
        check_training_example(tokenizer, {"messages": CONVERSATIONS[0]})


# --- loading and three SFT steps ---------------------------------------------------------------


def _sft_three_steps(model, tokenizer, output_dir) -> tuple[int, int]:
    """Run three SFT steps with assistant-only loss; return (changed, total) trainable tensors."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, bf16=False, report_to=[], save_strategy="no", assistant_only_loss=True, max_length=128)
    dataset = Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)
    return changed, len(before)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
def test_load_model_hf_trains_lora(tiny_model_dir, tmp_path, load_in_4bit):
    model, tokenizer = load_model(tiny_model_dir, backend="hf", load_in_4bit=load_in_4bit, lora=LoraSettings(r=8))
    fix_special_tokens(model, tokenizer)
    quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert quantized == load_in_4bit

    changed, total = _sft_three_steps(model, tokenizer, tmp_path / "sft")

    assert total > 0 and changed == total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_load_adapter_model_restores_trained_adapter(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=8))
    fix_special_tokens(model, tokenizer)
    _sft_three_steps(model, tokenizer, tmp_path / "sft")
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}

    frozen, reloaded_tokenizer = load_adapter_model(tmp_path / "adapter", backend="hf")
    resumed, _ = load_adapter_model(tmp_path / "adapter", backend="hf", trainable=True)

    assert modeling.has_generation_markers(reloaded_tokenizer.chat_template)  # the fixed tokenizer came back
    assert not any(p.requires_grad for p in frozen.parameters())
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(trained)
    assert all(torch.equal(trained[n], p.detach()) for n, p in resumed.named_parameters() if n in trained)


@pytest.mark.cpu_only
def test_auto_backend_picks_hf_without_cuda(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="brandcopy.backend"):
        model, _ = load_model(tiny_model_dir)
    assert "backend=auto -> hf" in caplog.text and "no CUDA" in caplog.text
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_auto_backend_falls_back_to_hf_on_gpu_without_unsloth(monkeypatch, caplog):
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: True)
    _hide_module(monkeypatch, "unsloth")
    with caplog.at_level(logging.INFO, logger="brandcopy.backend"):
        assert resolve_backend("auto") == "hf"
    assert "CUDA is present but" in caplog.text and "unsloth is not installed" in caplog.text


UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import unsloth  # first, as on a GPU
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from brandcopy.modeling import LoraSettings, fix_special_tokens, load_model

    model_dir, output_dir, conversations = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model, tokenizer = load_model(model_dir, backend="unsloth", load_in_4bit=True, lora=LoraSettings(r=8))
    fix_special_tokens(model, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, bf16=False, report_to=[], save_strategy="no", assistant_only_loss=True,
                     max_length=128)
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)
    print("RESULT " + json.dumps({
        "device": unsloth.DEVICE_TYPE, "changed": changed, "total": len(before),
        "quantized": any(type(m).__name__ == "Linear4bit" for m in model.modules()),
    }))
    """
)


@pytest.mark.cpu_only
def test_load_model_unsloth_cpu_fallback_trains_lora(tiny_model_dir, tmp_path):
    pytest.importorskip("unsloth")  # find_spec only: importing unsloth here would patch trl for every test
    result = subprocess.run(
        [sys.executable, "-c", UNSLOTH_SCRIPT, str(tiny_model_dir), str(tmp_path / "sft"), json.dumps(CONVERSATIONS)],
        capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    outcome = json.loads(lines[-1][len("RESULT "):])
    assert outcome["device"] == "cpu" and outcome["quantized"]
    assert outcome["total"] > 0 and outcome["changed"] == outcome["total"]


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any weights are loaded: bad input must be caught before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", refuse)


def _hide_module(monkeypatch, name):
    find_spec = modeling.importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))


def test_missing_model_path_is_a_clear_error(tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match="does not exist.*build_tiny_model"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter_model(tmp_path)


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_model_dir, tmp_path, no_model_loading):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    (copy / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template.*QWEN25_CHAT_TEMPLATE"):
        load_model(copy, backend="hf")


def test_unsloth_missing_is_a_clear_error(tiny_model_dir, monkeypatch, no_model_loading):
    _hide_module(monkeypatch, "unsloth")
    with pytest.raises(ImportError, match="unsloth is not installed.*pip install --no-deps unsloth"):
        load_model(tiny_model_dir, backend="unsloth")


def test_bitsandbytes_missing_is_a_clear_error(tiny_model_dir, monkeypatch, no_model_loading):
    _hide_module(monkeypatch, "bitsandbytes")
    with pytest.raises(ImportError, match="needs bitsandbytes.*load_in_4bit=False"):
        load_model(tiny_model_dir, backend="hf", load_in_4bit=True)


def test_bad_backend_is_a_clear_error(tiny_model_dir, no_model_loading):
    with pytest.raises(ValueError, match="backend='vllm'"):
        load_model(tiny_model_dir, backend="vllm")


def test_adapter_folder_given_to_load_model_names_load_adapter_model(tmp_path, no_model_loading):
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="load_adapter_model"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="base_model_name_or_path is empty"):
        load_adapter_model(tmp_path)
