"""The general-ability regression check: the shipped prompts, one verifier per constraint type, strict and loose."""

import json

import pytest

from brandcopy.brand import load_brand
from brandcopy.ifeval import (
    VERIFIERS,
    IFEvalDataError,
    IFEvalPrompt,
    load_prompts,
    pass_rates,
    regressions,
    run_ifeval,
    score_response,
    verify,
    verify_loose,
)
from brandcopy.modeling import load_model

# type -> (constraint arguments, a response that passes, one that fails)
CASES = {
    "length": ({"min": 5, "max": 10}, "秋高 气爽天很蓝", "秋高气爽，天很蓝，风很轻。"),
    "include": ({"words": ["团队", "午饭"]}, "欢迎加入团队，中午一起吃午饭。", "欢迎加入团队。"),
    "exclude": ({"words": ["悲伤"]}, "雨夜很安静。", "雨夜有些悲伤。"),
    "paragraphs": ({"count": 2}, "第一段。\n\n第二段。", "第一段。\n第二段。"),
    "bullets": ({"count": 2}, "- 帐篷\n- 睡袋", "- 帐篷\n睡袋"),
    "numbered": ({"count": 3}, "1. 精神好\n2、效率高\n3．心情好", "1. 精神好\n3. 心情好"),
    "json": ({"keys": ["title", "author"]}, '```json\n{"title": "活着", "author": "余华"}\n```', '{"title": "活着"}'),
    "no_exclamation": ({}, "今天天气不错。", "今天天气真好！"),
    "start_with": ({"text": "小朋友们"}, "小朋友们，早晚都要刷牙。", "早晚都要刷牙，小朋友们。"),
    "end_with": ({"text": "收到请回复。"}, "明早九点开会，收到请回复。\n", "收到请回复。明早九点开会。"),
    "keyword_count": ({"word": "火候", "min": 2}, "火候要小，火候要稳。", "火候要小。"),
    "no_latin": ({}, "复利是利滚利。", "复利是compound interest。"),
    "title": ({}, "《雨夜》\n窗外的雨。", "雨夜\n窗外的雨。"),
    "no_comma": ({}, "清晨的公园很安静。", "清晨的公园，很安静。"),
    "wrap": ({"left": "「", "right": "」"}, "「守株待兔讽刺不劳而获。」", "守株待兔讽刺不劳而获。"),
}


def test_every_constraint_type_has_a_verifier_case():
    assert set(CASES) == set(VERIFIERS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_verifier_passes_and_fails(kind):
    arguments, good, bad = CASES[kind]
    constraint = {"type": kind, **arguments}
    assert verify(good, constraint) and not verify(bad, constraint)


def test_loose_forgives_a_preamble_and_markdown_but_strict_does_not():
    bullets = {"type": "bullets", "count": 2}
    answer = "好的，以下是清单：\n**- 帐篷**\n**- 睡袋**"
    assert not verify(answer, bullets) and verify_loose(answer, bullets)
    start = {"type": "start_with", "text": "小朋友们"}
    assert verify_loose("好的。\n小朋友们，要刷牙。", start) and not verify_loose("要刷牙，小朋友们。", start)
    for kind in VERIFIERS:  # loose never fails what strict passes, even for an empty answer
        constraint = {"type": kind, **CASES[kind][0]}
        for text in ("", CASES[kind][1]):
            assert verify_loose(text, constraint) or not verify(text, constraint)


def test_pass_rates_count_prompts_and_instructions():
    prompt = IFEvalPrompt("x", "写两段话，不用感叹号。", [{"type": "paragraphs", "count": 2}, {"type": "no_exclamation"}])
    scored = [score_response(prompt, "一。\n\n二。"), score_response(prompt, "一！\n\n二。"), score_response(prompt, "好的\n一\n二")]
    rates = pass_rates(scored)
    assert rates["prompt_strict"] == pytest.approx(1 / 3) and rates["instruction_strict"] == pytest.approx(4 / 6)
    # Loose checks each constraint on its own variants: dropping the line with "！" saves that constraint.
    assert rates["prompt_loose"] == pytest.approx(2 / 3) and rates["instruction_loose"] == pytest.approx(5 / 6)
    drops = regressions({"base": {"prompt_strict": 0.5}, "sft": {"prompt_strict": 0.3}, "dpo": {"prompt_strict": 0.48}}, 0.05)
    assert set(drops) == {"sft"} and drops["sft"] == pytest.approx(0.2)


def test_shipped_prompts_are_general_many_and_valid():
    prompts = load_prompts()
    assert len(prompts) >= 60 and len({p.id for p in prompts}) == len(prompts)
    assert {c["type"] for p in prompts for c in p.constraints} == set(VERIFIERS)
    for brand in ("yuansu",):
        loaded = load_brand(brand)
        names = [loaded.name, *(p.name for p in loaded.products.values()), "护肤", "精华", "成分"]
        assert not [p.id for p in prompts if any(name in p.prompt for name in names)]


def test_bad_prompt_file_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "a", "prompt": "写一句话。", "constraints": [{"type": "no_comma"}]}
    for row, message in [
        ({**good, "id": "b", "constraints": [{"type": "rhyme"}]}, r"bad.jsonl:2: field 'constraints\[0\]'.type: unknown constraint 'rhyme'"),
        ({**good, "id": "b", "constraints": [{"type": "length", "min": 1, "max": "九"}]}, r"bad.jsonl:2: field 'constraints\[0\]'.max: expected int"),
        ({"id": "b", "constraints": []}, r"bad.jsonl:2: field 'prompt'"),
        (good, r"bad.jsonl:2: field 'id': duplicate id 'a'"),
    ]:
        path.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
        with pytest.raises(IFEvalDataError, match=message):
            load_prompts(path)


def test_run_ifeval_on_the_tiny_model_scores_its_real_output(tiny_model_dir):
    from dataclasses import replace

    from brandcopy.ifeval import PARAMS
    from brandcopy.modeling import fix_special_tokens

    model, tokenizer = load_model(tiny_model_dir, backend="hf", load_in_4bit=False)
    fix_special_tokens(model, tokenizer)
    prompts = load_prompts(max_prompts=6)
    rates, scored = run_ifeval(model, tokenizer, prompts, replace(PARAMS, max_new_tokens=16), batch_size=6)
    assert [s["id"] for s in scored] == [p.id for p in prompts]
    # Re-scoring the generated text gives the same verdicts: the rates come from the model's output.
    assert [score_response(p, s["text"])["strict"] for p, s in zip(prompts, scored)] == [s["strict"] for s in scored]
    assert rates == pass_rates(scored) and 0.0 <= rates["prompt_strict"] <= rates["prompt_loose"] <= 1.0


def _adapter_run(root, tiny_model_dir):
    """Run ``t`` with sft, dpo and dpo-onpolicy adapters (random LoRA weights, so they differ from the base)."""
    import torch

    from brandcopy.modeling import LoraSettings

    model, tokenizer = load_model(tiny_model_dir, backend="hf", lora=LoraSettings(r=4, alpha=8))
    from brandcopy.modeling import fix_special_tokens

    fix_special_tokens(model, tokenizer)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    for stage, pairs in (("sft", None), ("dpo", "synthetic"), ("dpo-onpolicy", "onpolicy")):
        model.save_pretrained(root / "t" / stage)
        tokenizer.save_pretrained(root / "t" / stage)
        manifest = {"pairs": pairs, "train_pairs": 7} if pairs else {}
        (root / "t" / stage / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("margin", [1.0, -1.0])
def test_eval_report_has_pass_rates_per_model_the_flag_and_the_dpo_comparison(tmp_path, tiny_model_dir, margin):
    from brandcopy.config import EvalStageConfig, load_stage_config
    from brandcopy.evaluate import judge_endpoint, run_eval
    from brandcopy.mockserver import endpoint

    _adapter_run(tmp_path, tiny_model_dir)
    cfg = load_stage_config(EvalStageConfig, None, [
        "run=t", f"output_root={tmp_path}", f"model={tiny_model_dir}", "backend=hf", "load_in_4bit=false",
        "eval_max_new_tokens=8", "eval_max_samples=2", "eval_sampled=false", "eval_judge_base_url=scripted",
        "eval_ifeval_max_samples=8", f"eval_ifeval_margin={margin}"])
    with endpoint(judge_endpoint(cfg), load_brand(cfg.brand)) as judge:
        out = run_eval(cfg, judge)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "ifeval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(results["ifeval"]) == {"base", "sft", "dpo", "dpo-onpolicy"}
    for name, rates in results["ifeval"].items():
        scored = [r for r in rows if r["model"] == name]
        assert len(scored) == 8 and rates == pass_rates(scored)  # the report's numbers are the verdicts' numbers
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## General instruction following (regression check)" in report
    assert "## DPO: synthetic vs on-policy pairs" in report and "| dpo-onpolicy | onpolicy | 7 |" in report
    # margin -1: every stage is "more than -100% below" the base, so all are flagged; margin 1: none can be.
    assert ("**REGRESSION**" in report) == (margin < 0)
    assert report.count("| REGRESSION |") == (3 if margin < 0 else 0)
