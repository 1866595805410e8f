"""GRPO rewards grade with lint's grader: clean copy scores 1.0, each kind of fault lowers its reward."""

import logging

import pytest
from train_data import bad_copy, good_copy, products

from brandcopy.brand import load_brand, load_golden
from brandcopy.judge import judge_config
from brandcopy.mockserver import SCRIPTED, ScriptedServer, endpoint
from brandcopy.rewards import (
    REWARD_FUNCTIONS,
    completion_text,
    cta_reward,
    fact_reward,
    format_reward,
    judge_reward,
    judge_spec,
    length_score,
    lint_reward,
)

PRODUCT = products(1)[0]  # YS-001: contains 1% 泛醇, no 视黄醇
GOOD = good_copy(PRODUCT)


def score(reward, texts, content_type="paid_ad_cta"):
    """Call a reward the way TRL does: conversational completions plus every column and TRL's extras."""
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    n = len(texts)
    return reward(prompts=[[{"role": "user", "content": "写文案"}]] * n, completions=completions,
                  completion_ids=[[1]] * n, brand=["yuansu"] * n, content_type=[content_type] * n,
                  product_id=[PRODUCT["id"]] * n, trainer_state=None, log_extra=None, log_metric=None)


def test_clean_copy_gets_full_marks_from_every_grader():
    for name in ("lint", "fact", "format", "cta"):
        assert score(REWARD_FUNCTIONS[name], [GOOD]) == [1.0], name


def test_exaggerated_copy_loses_lint_cta_and_length():
    bad = bad_copy(PRODUCT)  # banned absolute claims, 6 exclamation marks, no CTA, 33 characters
    assert score(lint_reward, [bad])[0] < 0.2
    assert score(cta_reward, [bad]) == [0.0]
    assert score(format_reward, [bad])[0] == pytest.approx(33 / 50)


def test_fact_errors_are_caught_against_the_catalog():
    wrong_concentration = GOOD.replace("核心成分氨基酸表面活性剂", "含5%泛醇")
    unknown_ingredient = GOOD + "另含视黄醇。"
    assert score(fact_reward, [wrong_concentration, unknown_ingredient]) == [0.5, 0.5]
    assert score(fact_reward, [wrong_concentration + "另含视黄醇。"]) == [0.0]


def test_format_reward_grades_length_and_zeroes_markup():
    assert score(format_reward, ["<p>" + GOOD + "</p>"]) == [0.0]
    assert length_score("字" * 100, 200, 600) == 0.5 and length_score("字" * 1200, 200, 600) == 0.5
    assert length_score("字 \n" * 300, 200, 600) == 1.0  # whitespace does not count
    assert score(format_reward, [GOOD], "social_media_review")[0] < 1.0  # review copy needs 200+ characters


def test_cta_is_only_required_where_the_type_requires_it():
    no_cta = GOOD.replace("立即下单，体验温和护肤。", "")
    assert score(cta_reward, [no_cta], "paid_ad_cta") == [0.0]
    assert score(cta_reward, [no_cta], "social_media_educational") == [1.0]


def test_completion_text_reads_plain_and_conversational():
    assert completion_text("文案") == "文案"
    assert completion_text([{"role": "assistant", "content": "文案"}]) == "文案"


def _judge_column(tmp_path, base_url: str) -> str:
    return judge_spec(judge_config("mock-judge", base_url, None, 8, str(tmp_path / "cache")), tmp_path / "judge")


def _judge_score(tmp_path, record: dict, texts: list[str], judge: str) -> list[float]:
    n = len(texts)
    return judge_reward(prompts=[[{"role": "user", "content": record["instruction"]}]] * n,
                        completions=[[{"role": "assistant", "content": t}] for t in texts],
                        brand=["yuansu"] * n, content_type=[record["content_type"]] * n,
                        product_id=[record["product_id"]] * n, judge=[judge] * n, trainer_state=None)


def test_judge_reward_prefers_golden_copy_over_copy_with_banned_words(tmp_path):
    brand = load_brand("yuansu")
    record = load_golden(brand)[0]
    corrupted = "".join(brand.banned_words[:3]) + record["text"] + brand.banned_words[0]
    with endpoint(judge_config("heuristic-judge", SCRIPTED, None, 8, str(tmp_path / "cache")), brand) as judge:
        golden, bad = _judge_score(tmp_path, record, [record["text"], corrupted], judge_spec(judge, tmp_path / "judge"))
    assert 0.0 <= bad < golden <= 1.0
    assert golden > 0.5


def test_judge_reward_counts_unparseable_answers_as_zero(tmp_path, caplog):
    record = load_golden(load_brand("yuansu"))[0]
    with ScriptedServer(responder=lambda body: "抱歉，我无法评分。") as server:
        with caplog.at_level(logging.WARNING, logger="brandcopy.rewards"):
            rewards = _judge_score(tmp_path, record, [record["text"], "另一篇"], _judge_column(tmp_path, server.url))
    assert rewards == [0.0, 0.0]
    assert "2 of 2 judgements failed" in caplog.text
    assert "unparseable" in caplog.text
