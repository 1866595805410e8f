"""Both shipped brands through the same code: catalog and golden set, prompts, the typed fact schema,
data through the scripted server, and a tiny SFT on the second brand's data."""

import json
import re
import shutil

import pytest
from conftest import REPO, tiny_corpus, tiny_overrides

from brandcopy import prompts
from brandcopy.brand import BrandDataError, load_brand, load_golden
from brandcopy.config import SFTStageConfig, load_stage_config
from brandcopy.demo import build_data, llm_endpoint
from brandcopy.judge import JudgeItem, best_of_messages, single_messages
from brandcopy.lint import FACT_KINDS, lint_records, lint_text
from brandcopy.tiny import build_tiny_model
from brandcopy.run import read_metrics
from brandcopy.train.sft import run_sft

BRANDS = ["yuansu", "guanshan"]
# Words that belong to the first brand or to skincare; none may reach a prompt built for the tea brand.
SKINCARE_WORDS = ("原素方程", "Yuansu", "肌肤", "肤质", "护肤", "皮肤", "成分", "浓度", "化妆品", "配方师", "精华", "屏障")


@pytest.fixture(scope="module", params=BRANDS)
def brand(request):
    return load_brand(request.param)


@pytest.fixture(scope="module")
def tea():
    return load_brand("guanshan")


def test_catalog_and_golden_set_follow_the_contract(brand):
    golden = load_golden(brand)
    assert len(brand.products) >= 15 and len(golden) >= 45
    types = {}
    for record in golden:
        types.setdefault(record["product_id"], set()).add(record["content_type"])
        assert record["instruction"] == prompts.build_instruction(brand, record["product_id"], record["content_type"]), record["id"]
    complete = [pid for pid, seen in types.items() if seen == set(brand.content_types)]
    assert len(complete) >= 5 and set(brand.split()["val"]) & set(complete)
    dirty = [(r["id"], [v.to_dict() for v in res.violations]) for r, res in zip(golden, lint_records(brand, golden)) if not res.clean]
    assert dirty == []


def test_product_names_pass_their_own_fact_check(brand):
    for product in brand.products.values():
        assert not lint_text(brand, product.name, "paid_ad_cta", product.id).kinds() & FACT_KINDS, product.id


def test_instruction_shows_every_stated_fact_with_the_brands_labels(brand):
    for product in brand.products.values():
        text = prompts.build_instruction(brand, product.id, "paid_ad_fab")
        for key, value in product.facts.items():
            spec = brand.facts[key]
            assert f"- {spec.label}：{spec.display(value)}" in text, (product.id, key)
        assert all(m.name in text for m in product.materials)
        assert (brand.wording.claims_label in text) == bool(product.claims)


def test_tea_schema_uses_numbers_enums_sets_and_blends(tea):
    types = {spec.type for spec in tea.facts.values()}
    assert {"number", "enum", "set", "text"} <= types
    blends = [p for p in tea.products.values() if any(len(part.materials) > 1 for part in p.composition)]
    assert len(blends) >= 2 and all(sum(m.share for m in p.materials) == 100 for p in blends)
    text = prompts.build_instruction(tea, "GS-010", "paid_ad_cta")
    assert "原料：肉桂 60%；水仙 40%" in text and "冲泡水温：100℃" in text and "香气：焦糖香、桂皮香" in text
    assert "原料（茶坯）：福鼎大白茶" in prompts.build_instruction(tea, "GS-015", "paid_ad_cta")  # a single material: no share


def _every_prompt(brand, golden):
    """Every message list the library builds for a brand: chat, generation, cleaning, negatives, judge."""
    examples = [g["text"] for g in golden[:2]]
    for product_id in brand.products:
        for content_type in brand.content_types:
            yield prompts.chat_messages(brand, product_id, content_type)
            generation = prompts.generation_messages(brand, product_id, content_type, examples, variant=1)
            yield generation
            yield prompts.repair_messages(generation, "文案", ["length：太短"])
            for pass_name in prompts.CLEAN_PASSES:
                yield prompts.clean_messages(brand, product_id, content_type, "文案", pass_name)
            yield prompts.weak_messages(brand, product_id, content_type)
            yield prompts.exaggerated_messages(brand, product_id, content_type, "文案")
            yield prompts.fake_messages(brand, product_id, content_type, "文案", "桂花")
            item = JudgeItem("k", product_id, content_type, "指令", "参考", {"sft": "文案"})
            yield single_messages(brand, item, "sft")
            yield best_of_messages(brand, item, [("A", "文案"), ("B", "文案")])


def test_no_prompt_for_the_tea_brand_carries_the_skincare_brand(tea):
    golden = load_golden(tea)
    count = 0
    for messages in _every_prompt(tea, golden):
        count += 1
        for message in messages:
            leaked = [word for word in SKINCARE_WORDS if word in message["content"]]
            assert not leaked, (leaked, message["content"][:200])
    assert count > 1000


def test_shared_content_types_are_brand_neutral_and_a_brand_adds_to_them(tea):
    shared = (REPO / "data" / "content_types.yaml").read_text(encoding="utf-8")
    for name in ("原素方程", "观山茶事", "精简有效", "一山一味", "肌肤", "护肤", "茶"):
        assert name not in shared
    skincare = load_brand("yuansu")
    tea_review, skin_review = tea.content_type("social_media_review").instruction, skincare.content_type("social_media_review").instruction
    assert tea_review != skin_review and "叶底" in tea_review and "肤质" in skin_review


def test_brand_may_override_a_content_type(tmp_path):
    folder = tmp_path / "guanshan"
    shutil.copytree(REPO / "data" / "brands" / "guanshan", folder)
    path = folder / "brand.yaml"
    text = path.read_text(encoding="utf-8").replace(
        "content_types:\n", "content_types:\n  paid_ad_cta:\n    instruction: 只写一句话。\n", 1)
    path.write_text(text, encoding="utf-8")
    assert load_brand(folder).content_type("paid_ad_cta").instruction == "只写一句话。"
    path.write_text(text.replace("  paid_ad_cta:\n", "  radio_ad:\n", 1), encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"brand\.yaml:\d+: field 'content_types\.radio_ad': unknown content type"):
        load_brand(folder)


@pytest.mark.parametrize("edit,field,message", [
    (lambda p: p["composition"][0]["materials"][0].update(share=70), "composition[0].materials", "add up to 110"),
    (lambda p: p["facts"].update(water_temp=120), "facts.water_temp", "expected a number in [60, 100]"),
    (lambda p: p["facts"].update(aroma=["兰花香", "烟草香"]), "facts.aroma", "expected a non-empty list of"),
    (lambda p: p["facts"].update(roast="微焙火"), "facts.roast", "expected one of"),
    (lambda p: p["facts"].pop("taste"), "facts.taste", "missing field"),
])
def test_bad_typed_fact_is_named(tmp_path, edit, field, message):
    folder = tmp_path / "guanshan"
    shutil.copytree(REPO / "data" / "brands" / "guanshan", folder)
    path = folder / "products.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    product = json.loads(lines[9])  # GS-010, a blend of 60% 肉桂 and 40% 水仙
    edit(product)
    lines[9] = json.dumps(product, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BrandDataError, match=rf"products\.jsonl:10: field '{re.escape(field)}'.*{re.escape(message)}"):
        load_brand(folder)


@pytest.fixture(scope="module")
def tea_data(tea, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tea") / "t" / "data"
    with llm_endpoint(tea) as config:  # no base_url: the scripted server
        report = build_data(config, tea, data_dir)
    return data_dir, report


def test_data_through_the_scripted_server(brand, tmp_path, tea, tea_data):
    if brand.name == tea.name:
        data_dir, report = tea_data
    else:
        data_dir = tmp_path / "data"
        with llm_endpoint(brand) as config:
            report = build_data(config, brand, data_dir, content_types=["paid_ad_fab", "social_media_review"])
    golden = {(g["product_id"], g["content_type"]): g["text"] for g in load_golden(brand)}
    rows = [json.loads(line) for split in ("train", "val") for line in (data_dir / f"sft_{split}.jsonl").read_text().splitlines()]
    texts = [row["messages"][-1]["content"] for row in rows]
    opener, _, rest = zip(*(text.partition("\n") for text in texts))
    # golden copy, or golden copy behind the first-person opener of the scripted persona rewrite
    assert rows and all(t in golden.values() or (r in golden.values() and "我" in o) for t, o, r in zip(texts, opener, rest))
    for row in rows[:5]:
        user = row["messages"][1]["content"]
        product = next(p for p in brand.products.values() if f"「{p.name}」" in user)
        assert row["messages"][:2] == prompts.chat_messages(brand, product.id, _type_of(brand, user))
    negatives = [json.loads(line) for line in (data_dir / "negatives.jsonl").read_text().splitlines()]
    kinds = {n["kind"] for n in negatives}
    assert {"swap_material", "alter_fact", "insert_banned", "drop_cta"} <= kinds
    for negative in negatives:
        if negative["family"] == "fake":
            assert set(negative["violations"]) & FACT_KINDS, negative["id"]
    assert report["export"]


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _type_of(brand, user):
    return next(ct for ct, spec in brand.content_types.items() if f"撰写{spec.name_zh}。" in user)


def test_offline_fact_edits_are_plausible_and_never_inside_a_name(tea, tea_data):
    data_dir, _ = tea_data
    negatives = [json.loads(line) for line in (data_dir / "negatives.jsonl").read_text().splitlines()]
    cleaned = {json.loads(line)["id"]: json.loads(line)["text"] for line in (data_dir / "cleaned.jsonl").read_text().splitlines()}
    altered = [n for n in negatives if n["kind"] == "alter_fact"]
    assert len(altered) >= 10
    for negative in altered:
        before = cleaned[negative["chosen_id"]]
        for name in (tea.name, *(p.name for p in tea.products.values())):
            assert before.count(name) == negative["text"].count(name), (name, negative["id"])
        for number in re.findall(r"\d+(?:\.\d+)?", negative["text"]):
            assert float(number) <= 3000  # no 300% or 190%: within the facts' ranges
        percents = [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", negative["text"])]
        assert all(0 < p <= 100 for p in percents)


def test_tiny_sft_on_the_tea_brand(tea_data, tmp_path):
    data_dir, _ = tea_data
    # A tiny model whose tokenizer has seen the tea brand's words, as the demo's does (repo_texts), so
    # that one example fits in a few hundred tokens.
    texts = tiny_corpus() + [line for row in _rows(data_dir / "sft_train.jsonl") for m in row["messages"] for line in m["content"].splitlines()]
    model_dir = build_tiny_model(tmp_path / "tiny-model", texts)
    overrides = tiny_overrides(tmp_path, model_dir) + [f"data_dir={data_dir}", "max_seq_length=512", "sft_max_steps=10",
                                                       "sft_learning_rate=5e-3", "sft_eval=false",
                                                       "sft_per_device_train_batch_size=1", "brand=guanshan"]
    out = run_sft(load_stage_config(SFTStageConfig, REPO / "configs" / "tiny-cpu.yaml", overrides))
    losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert "观山茶事" in (out / "training_example.txt").read_text(encoding="utf-8")
