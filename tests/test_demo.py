"""The demo's wiring helpers (the whole demo runs in test_notebooks.py's notebook run and in `make demo`)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from brandcopy.brand import load_brand, load_golden
from brandcopy.cli import app
from brandcopy.config import ConfigError, EvalStageConfig, GRPOStageConfig, SFTStageConfig
from brandcopy.demo import (
    brand_corpus,
    ensure_tiny_model,
    judge_overrides,
    REPO,
    preset_path,
    repo_texts,
    run_overrides,
    stage_config,
)


def test_one_override_list_serves_every_stage():
    overrides = run_overrides("x", "/tmp/runs", ["grpo_max_steps=3", "learning_rate=1e-3", "eval_max_samples=2"])
    sft = stage_config(SFTStageConfig, "tiny-cpu", overrides)
    grpo = stage_config(GRPOStageConfig, "tiny-cpu", overrides)
    assert (sft.run, sft.output_root, sft.sft_learning_rate) == ("x", "/tmp/runs", 1e-3)
    assert (grpo.grpo_max_steps, grpo.grpo_learning_rate) == (3, 1e-3)
    assert str(sft.run_dir) == "/tmp/runs/x"


def test_unknown_or_mistyped_override_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="sft_max_step"):
        stage_config(SFTStageConfig, "tiny-cpu", ["sft_max_step=3"])
    with pytest.raises(ConfigError, match="grpo_max_steps"):
        stage_config(GRPOStageConfig, "tiny-cpu", ["grpo_max_steps=many"])


@pytest.mark.cpu_only
def test_preset_path_names_the_shipped_presets():
    assert preset_path("auto").name == "tiny-cpu.yaml"  # no CUDA in the test environment
    assert preset_path("qwen2.5-7b-24gb").is_file()
    with pytest.raises(FileNotFoundError, match="tiny-cpu"):
        preset_path("no-such-preset")


def test_ensure_tiny_model_builds_once_and_only_for_a_tiny_model_folder(pretrained_tiny_model_dir):
    assert ensure_tiny_model("Qwen/Qwen2.5-7B-Instruct") is None
    path = pretrained_tiny_model_dir  # built by ensure_tiny_model in the session fixture
    weights = path / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert ensure_tiny_model(path) == path
    assert weights.stat().st_mtime_ns == built
    pretraining = json.loads((path / "pretraining.json").read_text())
    assert pretraining["last_loss"] < pretraining["first_loss"] - 2.0  # it learned the brand's language


def test_judge_overrides_point_the_judge_at_an_endpoint():
    assert judge_overrides("") == []
    cfg = stage_config(EvalStageConfig, "tiny-cpu", judge_overrides("http://127.0.0.1:8000/v1", "served", ""))
    assert (cfg.eval_judge_base_url, cfg.eval_judge_model) == ("http://127.0.0.1:8000/v1", "served")
    assert cfg.eval_judge_api_key_env is None


def test_demo_command_rejects_a_bad_override_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["demo", f"output_root={tmp_path}", "sft_learning_rate=fast"])
    assert result.exit_code == 2
    assert "sft_learning_rate" in result.output
    assert not any(tmp_path.iterdir())


def test_the_tiny_models_text_is_the_data_folder_alone(tmp_path):
    # The demo's numbers come from a model built on this text: editing the README must not change them.
    shutil.copytree(REPO / "data", tmp_path / "data")
    (tmp_path / "README.md").write_text("# 改写过的说明\n新的段落。\n", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text("另一份文档\n", encoding="utf-8")
    assert repo_texts(tmp_path) == repo_texts(REPO)
    (tmp_path / "data" / "tiny_corpus.txt").open("a", encoding="utf-8").write("新增的一行语料\n")
    assert repo_texts(tmp_path) != repo_texts(REPO)


def test_the_tiny_models_text_holds_the_train_copy_but_never_the_val_copy():
    brand = load_brand("yuansu")
    val = set(brand.split()["val"])
    golden = load_golden(brand)
    corpus, tokenizer_text = set(brand_corpus()), "\n".join(repo_texts())
    assert all(r["text"] in corpus for r in golden if r["product_id"] not in val)
    held_out = [r["text"] for r in golden if r["product_id"] in val]
    assert held_out and not any(text in corpus or text[:40] in tokenizer_text for text in held_out)
    assert not any("<|im_end|>" in text for text in corpus)  # the base must not learn where a turn ends
