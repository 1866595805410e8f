"""Merge stage: the merged 16-bit model generates exactly what the adapter model generates."""

import json

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from brandcopy.config import ConfigError, EvalStageConfig, MergeStageConfig, load_stage_config
from brandcopy.modeling import load_adapter_model
from brandcopy.train.merge import check_merged_output, run_merge


@pytest.mark.cpu_only
def test_merged_model_greedy_output_equals_the_adapter_model(sft_run):
    overrides, sft_dir = sft_run
    cfg = load_stage_config(MergeStageConfig, REPO / "configs" / "tiny-cpu.yaml", overrides + ["merge_from=sft"])
    out = run_merge(cfg)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "manifest.json",
            "config.yaml"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    adapter_model, tokenizer = load_adapter_model(sft_dir, backend="hf")
    merged = AutoModelForCausalLM.from_pretrained(out)
    # the model's own stop list (Qwen2.5-Instruct's [<|im_end|>, <|endoftext|>]) survives the merge
    assert merged.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    messages = [{"role": "system", "content": "你是元素护肤的品牌文案助手，语气专业、克制、真诚。"},
                {"role": "user", "content": "请为「氨基酸温和洁面乳」写一篇paid_ad_cta文案。"}]
    inputs = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, add_generation_prompt=True,
                                                                    return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = adapter_model.generate(**inputs, max_new_tokens=40, do_sample=False)
        got = merged.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert torch.equal(expected, got)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["merged_from"] == str(sft_dir) and len(manifest["adapter_sha256"]) == 1


def test_gguf_needs_unsloth(tmp_path):
    cfg = load_stage_config(MergeStageConfig, REPO / "configs" / "tiny-cpu.yaml",
                            [f"output_root={tmp_path}", "merge_gguf=q4_k_m"])
    with pytest.raises(ConfigError, match="merge_gguf='q4_k_m' needs backend: unsloth"):
        run_merge(cfg)


def test_check_merged_output_counts_identical_greedy_outputs(sft_run):
    overrides, _ = sft_run
    run_merge(load_stage_config(MergeStageConfig, REPO / "configs" / "tiny-cpu.yaml", overrides + ["merge_from=sft"]))
    cfg = load_stage_config(EvalStageConfig, REPO / "configs" / "tiny-cpu.yaml", overrides + ["eval_max_new_tokens=12"])
    check = check_merged_output(cfg, "sft", n=2)
    assert str(check) == "identical greedy output on 2 of 2 prompts"
    assert [g.token_ids for g in check.adapter_outputs] == [g.token_ids for g in check.merged_outputs]
    assert all(g.new_tokens > 0 for g in check.merged_outputs)
