"""On-policy pairs: the SFT model's own samples, judged and improved through the scripted server, then DPO."""

import json
import shutil
from dataclasses import replace

import pytest
from conftest import REPO

from brandcopy.brand import load_brand
from brandcopy.config import DPOStageConfig, EvalStageConfig, load_stage_config
from brandcopy.improve import SAMPLE_PARAMS, build_pairs, parse_judgement, run_improve
from brandcopy.judge import JudgeParseError
from brandcopy.llm import LLMConfig, read_jsonl_records
from brandcopy.mockserver import ScriptedServer, improve_responder
from brandcopy.prompts import chat_messages
from brandcopy.train.dpo import run_dpo

BRAND = load_brand("yuansu")
GARBAGE = ["我觉得这篇还行。", '```json\n{"verdict": "maybe", "reasons": []}\n```', "{verdict: bad}"]


def test_parse_judgement_is_lenient_about_form_and_strict_about_content():
    fenced = '评审如下：\n```json\n｛"verdict"： "BAD"， "reasons"： ["缺少行动号召"]， "improved"： "改好的文案"｝\n```'
    judgement = parse_judgement(fenced)
    assert (judgement.verdict, judgement.reasons, judgement.improved) == ("bad", ["缺少行动号召"], "改好的文案")
    assert parse_judgement('{"verdict": "good", "reasons": "结构完整"}').reasons == ["结构完整"]
    for text in GARBAGE + ['{"verdict": "bad", "reasons": [], "improved": ""}']:
        with pytest.raises(JudgeParseError):
            parse_judgement(text)


def _judged(key: str, original: str, answer: dict, problems=("length：太短",)) -> dict:
    meta = {"sample": key, "product_id": "YS-002", "content_type": "paid_ad_cta", "text": original, "problems": list(problems)}
    return {"key": key, "text": json.dumps(answer, ensure_ascii=False), "meta": meta}


def test_build_pairs_drops_good_samples_and_near_identical_pairs():
    improved = "清透不黏腻的防晒乳，日常通勤一支就够，点击下方链接，把轻盈带回家。"
    judged = [
        _judged("a", "很好用的防晒，快来买！！！", {"verdict": "bad", "reasons": ["感叹号"], "improved": improved}),
        _judged("b", improved[:-1], {"verdict": "bad", "reasons": ["少一个字"], "improved": improved}),
        _judged("c", improved, {"verdict": "good", "reasons": [], "improved": ""}, problems=()),
    ]
    pairs, counts = build_pairs(judged, max_similarity=0.8)
    assert counts == {"pairs": 1, "too_similar": 1, "judged_good": 1}
    assert pairs[0]["rejected"].endswith("！！！") and pairs[0]["chosen"] == improved and pairs[0]["source"] == "onpolicy"
    assert pairs[0]["rouge_l"] < 0.8


def test_policy_prompts_spread_a_cap_over_products_and_types():
    from brandcopy.improve import policy_prompts

    every = policy_prompts(BRAND, "train")
    assert len(every) == len(BRAND.split()["train"]) * len(BRAND.content_types)
    some = policy_prompts(BRAND, "train", max_prompts=len(BRAND.content_types))
    assert len(some) == len(BRAND.content_types) and len(set(some)) == len(some) and set(some) <= set(every)
    assert len({pid for pid, _ in some}) > 3 and len({ct for _, ct in some}) > 3  # not one product's, not one type's
    assert policy_prompts(BRAND, "train", max_prompts=len(BRAND.content_types)) == some  # the same draw each time
    assert policy_prompts(BRAND, "train", max_prompts=0) == every


@pytest.fixture
def improve_run(sft_run, tmp_path):
    """A copy of the finished SFT stage in a fresh run (so new stages do not leak into other tests)."""
    overrides, sft_dir = sft_run
    shutil.copytree(sft_dir, tmp_path / "r" / "sft")
    shutil.copytree(sft_dir.parent / "data", tmp_path / "r" / "data")
    return [*overrides, f"output_root={tmp_path}", "run=r"]


def test_improve_makes_onpolicy_pairs_counts_failures_resumes_and_dpo_trains_on_them(improve_run):
    cfg = load_stage_config(EvalStageConfig, REPO / "configs" / "tiny-cpu.yaml", improve_run)
    params = replace(SAMPLE_PARAMS, max_new_tokens=24)
    # The fixed draw of 3 prompts is YS-005, YS-030, YS-035: YS-005 and YS-035 have golden paid_ad_cta copy (the
    # scripted judge's improvement); YS-030 has none.
    options = dict(stage="sft", k=2, content_types=["paid_ad_cta"], max_prompts=3, params=params)
    with ScriptedServer(script=list(GARBAGE), responder=improve_responder(BRAND)) as server:
        config = LLMConfig(model="judge", base_url=server.url, api_key_env=None, concurrency=1, cache_dir=None)
        report = run_improve(cfg, config, **options)
    data = cfg.data_path
    assert report.samples == 6
    # The first request got three unparseable answers (first try + 2 repairs); YS-030's "improved" copy fails lint.
    assert report.counts == {"pairs": 3, "unparseable": 1, "improved_failed_lint": 2}
    samples = read_jsonl_records(data / "improve" / "samples_sft.jsonl")
    pairs = [json.loads(line) for line in (data / "onpolicy_train.jsonl").read_text(encoding="utf-8").splitlines()]
    by_key = {s["key"]: s["text"] for s in samples}
    for pair in pairs:
        assert pair["source"] == "onpolicy" and pair["product_id"] in ("YS-005", "YS-035")
        assert by_key[pair["id"]] == pair["rejected"]  # the rejected side is the model's own sample
        assert pair["lint"] and pair["rouge_l"] <= 0.8
    trl_rows = [json.loads(line) for line in (data / "preference_onpolicy_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert trl_rows[0]["prompt"] == chat_messages(BRAND, pairs[0]["product_id"], "paid_ad_cta")
    assert trl_rows[0]["chosen"][0]["content"] == pairs[0]["chosen"] and trl_rows[0]["source"] == "onpolicy"
    info = json.loads((data / "llamafactory" / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["brandcopy_dpo_onpolicy_train"]["ranking"] is True
    assert (data / "llamafactory" / "dpo_onpolicy_train.jsonl").is_file()

    # Rerun: no new samples; the answered requests are skipped, the failed ones are asked again.
    with ScriptedServer(responder=improve_responder(BRAND)) as server:
        config = LLMConfig(model="judge", base_url=server.url, api_key_env=None, concurrency=1, cache_dir=None)
        again = run_improve(cfg, config, **options)
        assert server.stats["requests"] == 1 + 2 * 3  # the unparseable key answered at once; YS-030's two with 2 repairs each
    assert read_jsonl_records(data / "improve" / "samples_sft.jsonl") == samples
    assert again.llm.skipped == 3 and again.counts == {"pairs": 4, "improved_failed_lint": 2}

    # The test tokenizer spends ~1500 tokens on a brand prompt, hence the longer max_seq_length.
    dpo = load_stage_config(DPOStageConfig, REPO / "configs" / "tiny-cpu.yaml",
                            improve_run + ["max_seq_length=2048", "dpo_pairs=onpolicy", "dpo_max_steps=3",
                                           "dpo_per_device_train_batch_size=2", "dpo_learning_rate=3e-3"])
    out = run_dpo(dpo)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert out.name == "dpo-onpolicy" and manifest["pairs"] == "onpolicy" and manifest["train_pairs"] == 4
    assert manifest["changed_tensors"] > 0
    assert not (cfg.run_dir / "dpo").exists()  # the synthetic variant's folder is left alone


def test_cli_improve_without_the_stage_exits_2_naming_it(tmp_path):
    from typer.testing import CliRunner

    from brandcopy.cli import app

    result = CliRunner().invoke(app, ["data", "improve", f"output_root={tmp_path}", "run=x", "--mock"])
    assert result.exit_code == 2 and "error: data improve starts from the sft stage" in result.output
    assert not (tmp_path / "x" / "data").exists()  # nothing written before the check


def test_the_serve_mock_responder_also_judges_and_improves():
    from brandcopy.brand import load_golden
    from brandcopy.improve import improve_messages, lint_problems
    from brandcopy.judge import JudgeItem, parse_scores, single_messages
    from brandcopy.mockserver import scripted_responder

    golden = next(r["text"] for r in load_golden(BRAND) if (r["product_id"], r["content_type"]) == ("YS-002", "paid_ad_cta"))
    respond = scripted_responder(BRAND)
    bad = improve_messages(BRAND, "YS-002", "paid_ad_cta", "太短了！！", lint_problems(BRAND, "太短了！！", "paid_ad_cta", "YS-002"))
    judgement = parse_judgement(respond({"messages": bad}))
    assert judgement.verdict == "bad" and judgement.improved == golden
    good = improve_messages(BRAND, "YS-002", "paid_ad_cta", golden, [])
    assert parse_judgement(respond({"messages": good})).verdict == "good"
    item = JudgeItem("k", "YS-002", "paid_ad_cta", "写文案", golden, {"sft": "太短了！！"})
    scores = [parse_scores(respond({"messages": single_messages(BRAND, item, name)})) for name in ("golden", "sft")]
    assert sum(scores[0].values()) > sum(scores[1].values())  # the judge prompts get the scripted judge's scores
