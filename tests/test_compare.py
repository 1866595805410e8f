"""brandcopy compare: base, two adapters on one base and a full model folder, side by side."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from brandcopy.brand import load_brand
from brandcopy.cli import app
from brandcopy.compare import CompareInputError, load_prompt_set, mark, resolve_model
from brandcopy.lint import lint_text
from brandcopy.modeling import LoraSettings, fix_special_tokens, load_model

BRAND = load_brand("yuansu")


def _adapter(tiny_model_dir, path, seed):
    """A LoRA adapter with random B weights (so it changes the output), saved with its tokenizer and a manifest."""
    model, tokenizer = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=4, alpha=8))
    fix_special_tokens(model, tokenizer)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "manifest.json").write_text("{}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """outputs/t with a finished ``sft`` adapter and ``merged`` (a full model copy); outputs/other/sft another adapter."""
    root = tmp_path_factory.mktemp("outputs")
    _adapter(tiny_model_dir, root / "t" / "sft", 0)
    _adapter(tiny_model_dir, root / "other" / "sft", 1)
    shutil.copytree(tiny_model_dir, root / "t" / "merged")
    (root / "t" / "merged" / "manifest.json").write_text("{}")
    return root / "t"


def test_model_specs_resolve_and_bad_ones_are_named(run_dir):
    assert resolve_model("base", run_dir).adapter is None and resolve_model("base", run_dir).model is None
    assert resolve_model("sft", run_dir).adapter == run_dir / "sft"
    other = resolve_model("brand2=other/sft", run_dir)
    assert other.label == "brand2" and other.adapter == run_dir.parent / "other" / "sft"
    assert resolve_model("merged", run_dir).model == run_dir / "merged"
    with pytest.raises(CompareInputError, match="model 'grpo': not 'base', a finished stage"):
        resolve_model("grpo", run_dir)


def test_prompt_sets_and_a_bad_prompt_file(tmp_path):
    val = load_prompt_set("val", BRAND, 3)
    assert len(val) == 3 and val[0].messages[0]["role"] == "system" and val[0].content_type
    assert load_prompt_set("ifeval", BRAND, 2)[0].messages == [{"role": "user", "content": load_prompt_set("ifeval", BRAND)[0].messages[0]["content"]}]
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "写一句话"}\n{"id": "b", "product_id": "YS-999", "content_type": "paid_ad_cta"}\n', encoding="utf-8")
    with pytest.raises(CompareInputError, match=r"p.jsonl:2: field 'product_id': unknown product 'YS-999'"):
        load_prompt_set(str(path), BRAND)


def test_mark_wraps_the_offending_spans():
    text = "这款精华效果最好！！点击链接购买。"
    found = lint_text(BRAND, text, "paid_ad_cta", "YS-002").violations
    marked = mark(text, found)
    assert "<mark>" in marked and marked.replace("<mark>", "").replace("</mark>", "") == text


def test_cli_compares_base_adapters_of_two_runs_and_a_full_model(run_dir, tiny_model_dir):
    out = run_dir / "cmp"
    result = CliRunner().invoke(app, [
        "compare", "--config", "configs/tiny-cpu.yaml", f"output_root={run_dir.parent}", "run=t", f"model={tiny_model_dir}",
        "--model", "base", "--model", "sft", "--model", "brand2=other/sft", "--model", "merged",
        "--max-prompts", "2", "--max-new-tokens", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["model"] for r in rows[:4]] == ["base", "sft", "brand2", "merged"] and len(rows) == 8
    texts = {r["model"]: r["text"] for r in rows if r["id"] == rows[0]["id"]}
    assert texts["base"] == texts["merged"]  # the full model is a copy of the base: greedy output identical
    assert texts["sft"] != texts["base"] and texts["brand2"] != texts["sft"]  # each adapter really applied
    for row in rows:
        assert row["lint"] == [v.to_dict() for v in lint_text(BRAND, row["text"], row["content_type"], row["product_id"]).violations]
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "- generation: greedy: max_new_tokens=12, do_sample=False; seed: 3407" in md and "- time: " in md
    assert md.count("| model | output | lint |") == 2 and "| brand2" in md


def test_cli_bad_model_exits_2_with_one_line(run_dir, tiny_model_dir):
    result = CliRunner().invoke(app, ["compare", f"output_root={run_dir.parent}", "run=t", f"model={tiny_model_dir}",
                                      "--model", "nosuch"])
    assert result.exit_code == 2 and "error: model 'nosuch'" in result.output
