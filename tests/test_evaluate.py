"""The eval stage end to end on the tiny model with a scripted judge: report numbers, PARTIAL, bad input."""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.brand import load_brand  # noqa: E402
from brandcopy.config import ConfigError, EvalStageConfig, load_stage_config  # noqa: E402
from brandcopy.display import eval_overview_markdown  # noqa: E402
from brandcopy.evaluate import judge_endpoint, models_to_evaluate, run_eval  # noqa: E402
from brandcopy.judge import DIMENSIONS  # noqa: E402
from brandcopy.mockserver import ScriptedServer, endpoint, read_judge_prompt  # noqa: E402
from brandcopy.modeling import LoraSettings, fix_special_tokens, load_model  # noqa: E402
from brandcopy.prompts import build_instruction  # noqa: E402
from brandcopy.run import StageInputError  # noqa: E402

TYPES = ["paid_ad_pas", "social_media_review", "paid_ad_fab", "paid_ad_pas"]


def _write_golden(brand_dir, product_ids):
    brand = load_brand(brand_dir)
    rows = [
        {"id": f"gold-{i}", "product_id": pid, "content_type": ct, "instruction": build_instruction(brand, pid, ct),
         "text": f"GOLD{i} 温和清洁，保湿不紧绷。点击下方链接了解配方详情"}
        for i, (pid, ct) in enumerate(zip(product_ids, TYPES))
    ]
    (brand_dir / "golden.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def brand_dir(tmp_path_factory):
    """A copy of the yuansu brand whose golden set has four val prompts with recognisable copy."""
    path = tmp_path_factory.mktemp("brand") / "yuansu"
    shutil.copytree(load_brand("yuansu").path, path, ignore=shutil.ignore_patterns("golden*"))
    _write_golden(path, load_brand(path).split()["val"])
    return path


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_model_dir):
    """outputs/ with run ``t`` holding a finished sft adapter (random LoRA weights, so it differs from base)."""
    root = tmp_path_factory.mktemp("outputs")
    model, tokenizer = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=4, alpha=8))
    fix_special_tokens(model, tokenizer)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(root / "t" / "sft")
    tokenizer.save_pretrained(root / "t" / "sft")
    (root / "t" / "sft" / "manifest.json").write_text("{}")
    return root


def _cfg(run_root, brand_dir, tiny_model_dir, *overrides):
    base = ["run=t", f"output_root={run_root}", f"brand={brand_dir}", f"model={tiny_model_dir}", "backend=hf",
            "load_in_4bit=false", "eval_max_new_tokens=6", "eval_batch_size=4", "eval_sampled=false",
            "eval_judge_api_key_env=null", "eval_side_by_side=2"]
    return load_stage_config(EvalStageConfig, None, base + list(overrides))


def _golden_judge(body):
    """Single answers: golden 5 everywhere, model copies 2; best-of: always the golden copy."""
    prompt = read_judge_prompt(body["messages"])
    if prompt.is_best_of:
        return json.dumps({"best": next(label for label, text in prompt.candidates if text.startswith("GOLD"))})
    score = 5 if prompt.candidates[0][1].startswith("GOLD") else 2
    return "```json\n" + json.dumps(dict.fromkeys(DIMENSIONS, score)) + "\n```"


def test_report_numbers_from_known_judge_answers(run_root, brand_dir, tiny_model_dir):
    with ScriptedServer(responder=_golden_judge) as server:
        out = run_eval(_cfg(run_root, brand_dir, tiny_model_dir, f"eval_judge_base_url={server.url}",
                            "eval_judge_model=mock", "eval_sampled=true"))
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == ["base", "sft"] and results["partial"] == []
    assert results["judge_means"]["overall"] == {"golden": 5.0, "base": 2.0, "sft": 2.0}
    assert results["best_counts"]["sft"]["overall"] == {"golden": 4}
    assert results["best_counts"]["sft"]["paid_ad_pas"] == {"golden": 2}
    bias = results["position_bias"]["sft"]
    assert bias["agreement"] == 1.0 and bias["ties"] == 0 and bias["failed"] == 0

    report = (out / "report.md").read_text()
    assert "PARTIAL" not in report
    assert "| overall | 4 | 5.000 | 2.000 | 2.000 | 4 | 0 | 0 | 0 | 0 |" in report
    assert "| paid_ad_pas | 2 | 5.000 | 2.000 | 2.000 | 2 | 0 | 0 | 0 | 0 |" in report
    assert "Position bias: the first position won" in report
    for group in ("paid_ad_pas", "paid_ad_fab", "social_media_review", "overall"):
        assert (out / "charts" / f"{group}.png").stat().st_size > 0
        assert f"(charts/{group}.png)" in report
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 2  # prompts x models x settings
    base = {r["id"]: r["text"] for r in rows if r["model"] == "base" and r["setting"] == "greedy"}
    sft = {r["id"]: r["text"] for r in rows if r["model"] == "sft" and r["setting"] == "greedy"}
    assert base != sft  # the adapter was really applied
    stages = {row["model"]: row for row in results["stages"]}
    assert list(stages) == ["base", "sft"]
    for name in ("base", "sft"):  # the table reads the offline metrics and losses it sits beside
        assert stages[name]["stop_rate"] == results["metrics"]["greedy"][name]["overall"]["stop_rate"]
        assert stages[name]["eval_loss"] == results["losses"][name]["eval_loss"]
        assert 0.0 <= stages[name]["brand_reward"] <= 1.0
        assert stages[name]["preference_accuracy"] is None  # no preference_val.jsonl in this run: not measured
    assert "## What each stage changed" in report and "(charts/stages.png)" in report
    assert (out / "charts" / "stages.png").stat().st_size > 0
    side = (out / "side_by_side.md").read_text()
    assert "greedy: max_new_tokens=6" in side and "sampled: max_new_tokens=6" in side
    assert side.count("## gold-") == 2 and "### sft" in side
    assert (out / "manifest.json").is_file()


def test_first_position_judge_shows_as_ties_and_bias(run_root, brand_dir, tiny_model_dir):
    def first(body):
        prompt = read_judge_prompt(body["messages"])
        return json.dumps({"best": prompt.candidates[0][0]}) if prompt.is_best_of else json.dumps(dict.fromkeys(DIMENSIONS, 3))

    with ScriptedServer(responder=first) as server:
        out = run_eval(_cfg(run_root, brand_dir, tiny_model_dir, f"eval_judge_base_url={server.url}", "eval_judge_model=first"))
    results = json.loads((out / "results.json").read_text())
    assert results["best_counts"]["sft"]["overall"] == {"tie": 4}
    assert results["position_bias"]["sft"]["first_won_original"] == 1.0
    assert "the first position won 100% of rounds in the original order and 100% after swapping" in (out / "report.md").read_text()


def test_garbage_judge_gives_a_partial_report_with_counted_failures(run_root, brand_dir, tiny_model_dir):
    with ScriptedServer(responder=lambda body: "抱歉，我无法评分。") as server:
        out = run_eval(_cfg(run_root, brand_dir, tiny_model_dir, f"eval_judge_base_url={server.url}", "eval_judge_model=junk"))
    report = (out / "report.md").read_text()
    assert report.splitlines()[2].startswith("> **PARTIAL**")
    assert "12 of 12 single-answer judgements and 8 of 8 best-of rounds failed" in report
    failures = json.loads((out / "results.json").read_text())["judge_failures"]
    assert failures["single_unparseable"] == 12 and failures["best_of_rounds_unparseable"] == 8
    assert "## Offline metrics" in report  # what did work is still reported
    results = json.loads((out / "results.json").read_text(), parse_constant=_not_json)  # valid JSON: null, never NaN
    assert results["position_bias"]["sft"]["agreement"] is None  # no round parsed: nothing measured
    assert "the orders agreed on –, 0 ties, 4 failed, of 4" in eval_overview_markdown(out)


def _not_json(constant: str):
    raise AssertionError(f"results.json holds {constant}, which is not JSON")


def test_judge_without_its_key_leaves_a_partial_report(run_root, brand_dir, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("BRANDCOPY_TEST_NO_SUCH_KEY", raising=False)
    out = run_eval(_cfg(run_root, brand_dir, tiny_model_dir, "eval_judge_api_key_env=BRANDCOPY_TEST_NO_SUCH_KEY",
                        "eval_models=[sft]"))
    report = (out / "report.md").read_text()
    assert "> **PARTIAL**" in report and "BRANDCOPY_TEST_NO_SUCH_KEY is not set" in report
    assert "base model is not among the evaluated models" in report


def test_heuristic_judge_runs_without_any_api(run_root, brand_dir, tiny_model_dir):
    cfg = _cfg(run_root, brand_dir, tiny_model_dir, "eval_judge_base_url=scripted", "eval_judge_model=heuristic-judge")
    with endpoint(judge_endpoint(cfg), load_brand(brand_dir)) as judge:
        out = run_eval(cfg, judge)
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] == [] and "heuristic" in results["judge"]
    assert sum(results["best_counts"]["sft"]["overall"].values()) == 4
    assert results["judge_failures"]["single_failed"] == results["judge_failures"]["best_of_rounds_failed"] == 0


def test_a_scripted_judge_nobody_started_leaves_a_partial_report(run_root, brand_dir, tiny_model_dir):
    out = run_eval(_cfg(run_root, brand_dir, tiny_model_dir, "eval_judge_base_url=scripted", "eval_models=[base]"))
    report = (out / "report.md").read_text()
    assert "> **PARTIAL**" in report and "base_url 'scripted' is not an http(s) URL" in report


def test_missing_stage_is_a_clear_error_before_loading(run_root, brand_dir, tiny_model_dir):
    with pytest.raises(StageInputError, match="dpo"):
        run_eval(_cfg(run_root, brand_dir, tiny_model_dir, "eval_models=[base,dpo]"))
    with pytest.raises(ConfigError, match="eval_models"):
        models_to_evaluate(_cfg(run_root, brand_dir, tiny_model_dir, "eval_models=[base,ppo]"))
    assert models_to_evaluate(_cfg(run_root, brand_dir, tiny_model_dir)) == ["base", "sft"]


def test_empty_val_split_is_a_clear_error(run_root, tmp_path, tiny_model_dir):
    brand_dir = tmp_path / "yuansu"
    shutil.copytree(load_brand("yuansu").path, brand_dir, ignore=shutil.ignore_patterns("golden*"))
    _write_golden(brand_dir, load_brand(brand_dir).split()["train"])  # golden copy for train products only
    with pytest.raises(ValueError, match="val split is empty"):
        run_eval(_cfg(run_root, brand_dir, tiny_model_dir))


def test_brand_reward_is_the_mean_of_grpos_rule_rewards(brand_dir, run_root, tiny_model_dir):
    from brandcopy.evaluate import brand_reward
    from brandcopy.generation import Generation

    cfg = _cfg(run_root, brand_dir, tiny_model_dir)
    brand = load_brand(brand_dir)
    record = {"product_id": brand.split()["val"][0], "content_type": "paid_ad_pas"}
    clean = Generation("温和清洁，保湿不紧绷。" * 8 + "点击下方链接了解配方详情。", [], 0, 0, True)
    broken = Generation("**全网最强** 100%根治痘痘！！！", [], 0, 0, True)
    assert brand_reward(cfg, [record], [clean]) > brand_reward(cfg, [record], [broken])
    assert brand_reward(cfg, [record, record], [clean, broken]) == pytest.approx(
        (brand_reward(cfg, [record], [clean]) + brand_reward(cfg, [record], [broken])) / 2)
