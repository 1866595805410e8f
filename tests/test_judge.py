"""The LLM judge: robust parsing, swapped orders and ties, counted failures, against a scripted server."""

import json

import pytest

from brandcopy.brand import load_brand
from brandcopy.judge import (
    BestOfVerdict,
    JudgeItem,
    JudgeParseError,
    best_counts,
    best_of_layouts,
    failure_counts,
    judge_best_of,
    judge_single,
    mean_scores,
    parse_best,
    parse_json_object,
    parse_scores,
    position_bias,
    single_messages,
)
from brandcopy.llm import LLMClient, LLMConfig
from brandcopy.mockserver import ScriptedServer, judge_responder, read_judge_prompt
from brandcopy.prompts import build_instruction

SCORES = {"tone": 4, "accuracy": 5, "structure": 3, "persuasion": 4, "instruction": 4}


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


@pytest.fixture(scope="module")
def items(brand):
    """Three val prompts whose copies carry markers a scripted judge can recognise."""
    val = brand.split()["val"]
    types = ["paid_ad_pas", "social_media_review", "paid_ad_pas"]
    return [
        JudgeItem(f"g{i}", pid, ct, build_instruction(brand, pid, ct), f"GOLD 文案{i}", {"sft": f"MODEL 文案{i}", "base": f"BASE 文案{i}"})
        for i, (pid, ct) in enumerate(zip(val, types))
    ]


def _client(server, tmp_path):
    return LLMClient(LLMConfig(model="mock", base_url=server.url, api_key_env=None, cache_dir=str(tmp_path / "cache"), max_retries=0))


def _best_label(body, marker):
    return next(label for label, text in read_judge_prompt(body["messages"]).candidates if text.startswith(marker))


# --- parsing ---------------------------------------------------------------------------------------


def test_parse_tolerates_fences_trailing_text_and_full_width():
    assert parse_json_object('```json\n{"best": "B"}\n```') == {"best": "B"}
    assert parse_json_object('评审结果如下：{"best": "K", "reason": "结构完整"} 以上。') == {"best": "K", "reason": "结构完整"}
    assert parse_json_object("｛“best”：“C”，“reason”：“好”｝") == {"best": "C", "reason": "好"}
    assert parse_json_object('{not json} then {"best": "A"}') == {"best": "A"}
    with pytest.raises(JudgeParseError):
        parse_json_object("我认为第二篇最好。")


def test_parse_scores_checks_every_dimension_and_range():
    assert parse_scores(json.dumps({**SCORES, "tone": "4", "accuracy": 5.0})) == SCORES
    for bad in ({**SCORES, "tone": 6}, {**SCORES, "tone": 0}, {**SCORES, "tone": True}, {**SCORES, "tone": 3.5}):
        with pytest.raises(JudgeParseError):
            parse_scores(json.dumps(bad))
    with pytest.raises(JudgeParseError, match="missing"):
        parse_scores(json.dumps({k: v for k, v in SCORES.items() if k != "persuasion"}))


def test_parse_best_normalises_the_label_and_rejects_unshown_ones():
    assert parse_best('{"best": "候选 b"}', ["K", "B", "R"]) == "B"
    assert parse_best('{"best": "【R】"}', ["K", "B", "R"]) == "R"
    with pytest.raises(JudgeParseError, match="not one of"):
        parse_best('{"best": "A"}', ["K", "B", "R"])
    with pytest.raises(JudgeParseError, match="best"):
        parse_best('{"winner": "K"}', ["K", "B", "R"])


# --- orders, verdicts, position bias -----------------------------------------------------------------


def test_layouts_are_random_deterministic_and_move_every_candidate():
    names = ["golden", "sft", "base"]
    first, second = best_of_layouts("g0:sft", names, seed=1)
    assert best_of_layouts("g0:sft", names, seed=1) == [first, second]
    assert sorted(n for _, n in first) == sorted(n for _, n in second) == sorted(names)
    assert all(a != b for (_, a), (_, b) in zip(first, second))  # every candidate changes position
    orders = {tuple(n for _, n in best_of_layouts(f"g{i}:sft", names, seed=1)[0]) for i in range(30)}
    assert len(orders) == 6  # all permutations occur across prompts
    labels = {label for i in range(30) for layout in best_of_layouts(f"g{i}:sft", names, 1) for label, _ in layout}
    assert len(labels) > 6  # labels are drawn, not fixed A/B/C


def test_verdicts_and_position_bias_hand_computed():
    order = [["golden", "sft", "base"], ["sft", "base", "golden"]]
    verdicts = [
        BestOfVerdict("a", "paid_ad_pas", "sft", order, ["golden", "golden"], [None, None]),  # agree
        BestOfVerdict("b", "paid_ad_pas", "sft", order, ["golden", "sft"], [None, None]),  # both first: tie
        BestOfVerdict("c", "paid_ad_fab", "sft", order, ["sft", "sft"], [None, None]),  # agree
        BestOfVerdict("d", "paid_ad_fab", "sft", order, [None, "sft"], ["unparseable answer: x", None]),
    ]
    assert [v.verdict for v in verdicts] == ["golden", "tie", "sft", "failed"]
    bias = position_bias(verdicts)
    assert bias["first_won_original"] == pytest.approx(2 / 3)  # a, b won by golden in first position
    assert bias["first_won_swapped"] == pytest.approx(3 / 4)  # b, c, d won by sft in first position
    assert bias["agreement"] == pytest.approx(2 / 3)
    assert (bias["ties"], bias["failed"], bias["n"]) == (1, 1, 4)
    counts = best_counts(verdicts)
    assert counts["paid_ad_pas"] == {"golden": 1, "tie": 1}
    assert counts["overall"] == {"golden": 1, "tie": 1, "sft": 1, "failed": 1}


# --- against the scripted server -----------------------------------------------------------------------


def test_single_scores_parse_failures_counted_not_zero(brand, items, tmp_path):
    def responder(body):
        text = read_judge_prompt(body["messages"]).candidates[0][1]
        if text.startswith("GOLD"):
            return "```json\n" + json.dumps({**SCORES, "tone": 5}) + "\n```"
        if text.startswith("MODEL"):
            return "评分：" + json.dumps(SCORES, ensure_ascii=False).replace(":", "：") + "。"
        return "这篇文案整体不错，我给四分。"  # garbage: no JSON

    with ScriptedServer(responder=responder) as server:
        scores = judge_single(_client(server, tmp_path), brand, items, ["golden", "sft", "base"], tmp_path / "judge")
    means = mean_scores(scores)
    assert means["overall"] == pytest.approx({"golden": 4.2, "sft": 4.0})  # base has no parsed score at all
    assert means["paid_ad_pas"] == pytest.approx({"golden": 4.2, "sft": 4.0})
    failures = failure_counts(scores, [])
    assert (failures["single_total"], failures["single_failed"], failures["single_unparseable"]) == (9, 3, 3)
    assert all(s.scores is None and "unparseable" in s.error for s in scores if s.candidate == "base")


def test_golden_is_scored_without_itself_as_reference(brand, items):
    assert "参考文案" not in single_messages(brand, items[0], "golden")[1]["content"]
    assert items[0].golden in single_messages(brand, items[0], "sft")[1]["content"]


def test_first_position_judge_gives_only_ties(brand, items, tmp_path):
    def responder(body):
        return json.dumps({"best": read_judge_prompt(body["messages"]).candidates[0][0], "reason": "第一篇"})

    with ScriptedServer(responder=responder) as server:
        verdicts = judge_best_of(_client(server, tmp_path), brand, items, "sft", tmp_path / "judge", seed=0)
    assert [v.verdict for v in verdicts] == ["tie"] * 3
    bias = position_bias(verdicts)
    assert (bias["first_won_original"], bias["first_won_swapped"], bias["agreement"], bias["ties"]) == (1.0, 1.0, 0.0, 3)


def test_consistent_judge_wins_whatever_the_order(brand, items, tmp_path):
    with ScriptedServer(responder=lambda body: json.dumps({"best": _best_label(body, "MODEL")})) as server:
        verdicts = judge_best_of(_client(server, tmp_path), brand, items, "sft", tmp_path / "judge", seed=0)
        calls = server.stats["requests"]
        again = judge_best_of(_client(server, tmp_path), brand, items, "sft", tmp_path / "judge2", seed=0)
        assert server.stats["requests"] == calls  # a rerun is answered from the cache
    assert [v.verdict for v in verdicts] == ["sft"] * 3 == [v.verdict for v in again]
    # seed 0 shows first: g0 sft then base, g1 sft then golden, g2 golden then sft
    assert [[order[0] for order in v.orders] for v in verdicts] == [["sft", "base"], ["sft", "golden"], ["golden", "sft"]]
    bias = position_bias(verdicts)
    assert [bias["first_won_original"], bias["first_won_swapped"]] == pytest.approx([2 / 3, 1 / 3])
    assert bias["agreement"] == 1.0


def test_garbage_rounds_are_failures_not_verdicts(brand, items, tmp_path):
    def responder(body):
        prompt = read_judge_prompt(body["messages"])
        if prompt.candidates[0][1].startswith("GOLD"):
            return '{"best": "Z9"}'  # a label that was never shown
        return json.dumps({"best": _best_label(body, "BASE")})

    with ScriptedServer(responder=responder) as server:
        verdicts = judge_best_of(_client(server, tmp_path), brand, items, "sft", tmp_path / "judge", seed=0)
    shown_first = [[order[0] for order in v.orders] for v in verdicts]
    for verdict, firsts in zip(verdicts, shown_first):
        assert verdict.verdict == ("failed" if "golden" in firsts else "base")
    assert [v.verdict for v in verdicts] == ["base", "failed", "failed"]  # golden shown first in g1's and g2's rounds
    failures = failure_counts([], verdicts)
    assert failures["best_of_rounds_unparseable"] == sum(firsts.count("golden") for firsts in shown_first) == 2


def test_failed_requests_are_counted(brand, items, tmp_path):
    with ScriptedServer(script=[{"fault": "server_error"}] * 100) as server:
        scores = judge_single(_client(server, tmp_path), brand, items[:1], ["sft"], tmp_path / "judge")
    assert scores[0].scores is None and scores[0].error.startswith("request failed")


def test_heuristic_responder_prefers_clean_copy_and_is_order_free(brand, items, tmp_path):
    clean, bad = items[0].golden, "神器！！！家人们闭眼入，100%有效，一夜回春！"
    item = JudgeItem("h0", items[0].product_id, "paid_ad_pas", items[0].instruction, clean, {"sft": bad, "base": ""})
    with ScriptedServer(responder=judge_responder(brand)) as server:
        client = _client(server, tmp_path)
        verdicts = judge_best_of(client, brand, [item], "sft", tmp_path / "judge", seed=0)
        scores = judge_single(client, brand, [item], ["golden", "sft", "base"], tmp_path / "judge")
    assert verdicts[0].winners == ["golden", "golden"]
    by_name = {s.candidate: s.mean for s in scores}
    assert by_name["golden"] > by_name["sft"] and by_name["base"] == 1.0
