"""Offline metrics against hand-computed values, and completion-only loss against transformers' own loss."""

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.brand import load_brand  # noqa: E402
from brandcopy.lint import lint_text  # noqa: E402
from brandcopy.metrics import Sample, completion_loss, distinct_n, lcs_length, offline_metrics, rouge_l  # noqa: E402
from brandcopy.modeling import load_model  # noqa: E402

CTA = "点击下方链接了解配方详情"
WRONG_CONCENTRATION = "泛醇浓度为5%，温和清洁。"  # 13 characters; YS-001 has 1% panthenol
UNKNOWN_INGREDIENT = f"含有烟酰胺，温和清洁。{CTA}。"  # 24 characters; YS-001 has no niacinamide
CLEAN_AD = f"温和清洁，保湿不紧绷。{CTA}"


def _dp_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_hand_computed_and_against_dynamic_programming():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length(list("我爱北京天安门"), list("北京我爱")) == 2
    assert lcs_length([], list("abc")) == lcs_length(list("abc"), []) == 0
    rng = __import__("random").Random(0)
    for _ in range(50):
        a = [rng.choice("甲乙丙丁戊") for _ in range(rng.randrange(0, 90))]
        b = [rng.choice("甲乙丙丁戊") for _ in range(rng.randrange(0, 90))]
        assert lcs_length(a, b) == _dp_lcs(a, b)


def test_rouge_l_on_characters_ignores_whitespace():
    # LCS("我爱北京", "我爱上海北京") = 4: precision 4/4, recall 4/6, F1 = 0.8
    assert rouge_l("我爱 北京", "我爱上海北京") == pytest.approx(0.8)
    assert rouge_l("温和清洁", "温和清洁") == 1.0
    assert rouge_l("", "温和清洁") == 0.0


def test_rouge_l_on_jieba_words():
    assert rouge_l("温和清洁的洁面乳", "温和清洁的洁面乳", unit="word") == 1.0
    assert rouge_l("温和", "清洁", unit="word") == 0.0
    with pytest.raises(ValueError, match="unit"):
        rouge_l("a", "a", unit="bpe")


def test_distinct_n_hand_computed():
    # characters a a b | a b: 5 unigrams, 2 unique; bigrams aa ab | ab: 3, 2 unique
    assert distinct_n(["aab", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["aab", "a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["", "a"], 2) == 0.0


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


def test_offline_metrics_hand_computed(brand):
    samples = [
        Sample("paid_ad_pas", "YS-001", WRONG_CONCENTRATION, "温和清洁", True),
        Sample("paid_ad_pas", "YS-001", UNKNOWN_INGREDIENT, "温和清洁", False),
        Sample("paid_ad_fab", "YS-001", CLEAN_AD, CLEAN_AD, True),
        Sample("social_media_review", "YS-001", "  ", "温和清洁", True),
    ]
    kinds = [{v.kind for v in lint_text(brand, s.text, s.content_type, s.product_id).violations} for s in samples]
    assert "wrong_share" in kinds[0] and "missing_cta" in kinds[0]  # the grader sees what the values assume
    assert "unknown_material" in kinds[1] and "missing_cta" not in kinds[1]
    assert not kinds[2] & {"unknown_material", "wrong_share", "unsupported_claim", "missing_cta"}

    result = offline_metrics(brand, samples)
    overall = result["overall"]
    assert set(result) == {"paid_ad_pas", "paid_ad_fab", "social_media_review", "overall"}
    assert overall["n"] == 4
    assert overall["empty_rate"] == 0.25
    assert overall["stop_rate"] == 0.75
    assert overall["fact_pass_rate"] == 0.5  # two of four copies have a fact error
    assert overall["cta_rate"] == pytest.approx(2 / 3)  # three ads, one without a call to action
    assert overall["length"] == pytest.approx((13 + 24 + len(CLEAN_AD) + 0) / 4)
    assert overall["length_ratio"] == pytest.approx((13 / 4 + 24 / 4 + 1 + 0) / 4)
    assert overall["rouge_l"] == pytest.approx((8 / 17 + 2 / 7 + 1 + 0) / 4)
    # 1 / (1 + violations): wrong_share + length + missing_cta -> 1/4; unknown_material + length -> 1/3;
    # the clean ad and the blank copy are both too short (length) -> 1/2 each
    assert overall["lint_score"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    pas = result["paid_ad_pas"]
    assert (pas["n"], pas["fact_pass_rate"], pas["cta_rate"], pas["stop_rate"]) == (2, 0.0, 0.5, 0.5)
    assert math.isnan(result["social_media_review"]["cta_rate"])  # no ads in that group
    assert result["paid_ad_fab"]["rouge_l"] == 1.0


def test_offline_metrics_refuse_an_empty_split(brand):
    with pytest.raises(ValueError, match="no samples"):
        offline_metrics(brand, [])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, backend="hf")


def _conversation(question, answer):
    return [{"role": "system", "content": "你是品牌文案助手。"}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def _hf_loss(model, tokenizer, conversation):
    """transformers' own loss with the prompt masked out: the reference value."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    completion = tokenizer(conversation[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([list(prompt) + completion])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item(), len(completion)


def test_completion_loss_matches_transformers_and_weights_by_tokens(tiny):
    model, tokenizer = tiny
    conversations = [_conversation("写一句洁面乳广告", "温和清洁，保湿不紧绷。"),
                     _conversation("请写一篇关于烟酰胺的长笔记，讲清楚浓度", "烟酰胺是维生素B3的一种形式。")]
    (loss_a, n_a), (loss_b, n_b) = (_hf_loss(model, tokenizer, c) for c in conversations)
    single = completion_loss(model, tokenizer, conversations[:1])
    assert single["eval_loss"] == pytest.approx(loss_a, rel=1e-5)
    assert single["perplexity"] == pytest.approx(math.exp(loss_a), rel=1e-5)
    both = completion_loss(model, tokenizer, conversations, batch_size=2)  # padded batch
    assert both["tokens"] == n_a + n_b
    assert both["eval_loss"] == pytest.approx((loss_a * n_a + loss_b * n_b) / (n_a + n_b), rel=1e-5)


def test_completion_loss_is_the_same_when_the_forward_ignores_logits_to_keep(tiny):
    model, tokenizer = tiny
    conversations = [_conversation("写一句洁面乳广告", "温和清洁，保湿不紧绷。"),
                     _conversation("请写一篇关于烟酰胺的长笔记，讲清楚浓度", "烟酰胺是维生素B3的一种形式。")]

    class EveryPosition(torch.nn.Module):  # a forward without logits_to_keep (older or patched model classes)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.device = inner, inner.device

        def forward(self, logits_to_keep=None, **kwargs):
            return self.inner(**kwargs)

    trimmed = completion_loss(model, tokenizer, conversations, batch_size=2)
    full = completion_loss(EveryPosition(model), tokenizer, conversations, batch_size=2)
    assert full["tokens"] == trimmed["tokens"] and full["eval_loss"] == pytest.approx(trimmed["eval_loss"], rel=1e-6)


def test_completion_loss_ignores_the_prompt(tiny):
    model, tokenizer = tiny
    short = completion_loss(model, tokenizer, [_conversation("短", "温和清洁。")])
    long = completion_loss(model, tokenizer, [_conversation("很长很长的问题" * 20, "温和清洁。")])
    assert short["tokens"] == long["tokens"]  # only completion tokens (+ end of turn) are scored
    with pytest.raises(ValueError, match="assistant"):
        completion_loss(model, tokenizer, [_conversation("短", "温和清洁。")[:-1]])


def test_preference_accuracy_counts_pairs_whose_chosen_answer_is_more_likely(tiny):
    from brandcopy.metrics import preference_accuracy

    model, tokenizer = tiny
    prompt = [{"role": "user", "content": "写一句洁面乳广告"}]
    short, long = [{"role": "assistant", "content": "温和。"}], [{"role": "assistant", "content": "温和清洁，保湿不紧绷。" * 5}]
    # A random model gives every extra token a log-probability far below zero: the short answer is more likely.
    assert preference_accuracy(model, tokenizer, [{"prompt": prompt, "chosen": short, "rejected": long}]) == 1.0
    pairs = [{"prompt": prompt, "chosen": long, "rejected": short}, {"prompt": prompt, "chosen": short, "rejected": long}]
    assert preference_accuracy(model, tokenizer, pairs, batch_size=2) == 0.5  # padded batch scores alike
    with pytest.raises(ValueError, match="no preference pairs"):
        preference_accuracy(model, tokenizer, [])
