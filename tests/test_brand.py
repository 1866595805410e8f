"""Brand loading, catalog plausibility, the product-level split, bad input, and prompts."""

import json
import re
import shutil
from pathlib import Path

import pytest

from brandcopy.brand import BrandDataError, load_brand, load_content_types, load_golden, read_records
from brandcopy.lint import FACT_KINDS, lint_text
from brandcopy.prompts import build_instruction, chat_messages, system_prompt

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "data" / "brands" / "yuansu" / "golden.jsonl"
TYPES = ["social_media_educational", "social_media_myth_busting", "social_media_review", "social_media_storytelling",
         "ecommerce_long_form", "paid_ad_pas", "paid_ad_fab", "paid_ad_bab", "paid_ad_cta"]
# Maximum concentrations allowed in China (化妆品安全技术规范) for the catalog's restricted ingredients.
LIMITS = {"水杨酸": 2.0, "双-乙基己氧苯酚甲氧苯基三嗪": 10.0, "二乙氨羟苯甲酰基苯甲酸己酯": 10.0, "甲氧基肉桂酸乙基己酯": 10.0,
          "乙基己基三嗪酮": 5.0, "亚甲基双-苯并三唑基四甲基丁基酚": 10.0, "氧化锌": 25.0, "二氧化钛": 25.0, "视黄醇": 0.3}


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


@pytest.fixture
def brand_copy(tmp_path):
    """A writable copy of the yuansu folder."""
    folder = tmp_path / "yuansu"
    shutil.copytree(REPO / "data" / "brands" / "yuansu", folder, ignore=shutil.ignore_patterns("golden*"))
    return folder


def test_content_types_follow_the_contract(brand):
    assert list(brand.content_types) == TYPES
    for spec in brand.content_types.values():
        expected = {"social": (200, 600), "ecommerce": (400, 1000), "paid_ad": (50, 220)}[spec.family]
        assert spec.length == expected
        assert spec.cta_required == (spec.family == "paid_ad")
        assert spec.instruction and spec.structure and spec.purpose


def test_catalog_size_and_ids(brand):
    assert len(brand.products) >= 40
    assert all(pid.startswith("YS-") for pid in brand.products)
    assert len({p.name for p in brand.products.values()}) == len(brand.products)


def test_catalog_is_regulatorily_consistent(brand):
    for p in brand.products.values():
        whitening = {"美白", "淡斑", "提亮"} & set(p.claims)
        assert not whitening or p.facts["registration"] == "特殊化妆品（祛斑美白）", p.id
        assert ("防晒" in p.claims) == (p.facts["registration"] == "特殊化妆品（防晒）") == ("spf" in p.facts) == ("pa" in p.facts), p.id
        for material in p.materials:
            if material.name in LIMITS:
                assert material.share <= LIMITS[material.name], (p.id, material)
        names = {m.name for m in p.materials}
        if "水杨酸" in names:
            assert "含水杨酸，三岁以下儿童勿用" in p.facts["cautions"], p.id
        if "视黄醇" in names:
            assert any("夜间" in c for c in p.facts["cautions"]) and any("孕期" in c for c in p.facts["cautions"]), p.id


def test_product_names_pass_their_own_fact_check(brand):
    for p in brand.products.values():
        result = lint_text(brand, p.name, "paid_ad_cta", p.id)
        assert not result.kinds() & FACT_KINDS, (p.id, result.violations)


def test_split_is_deterministic_disjoint_and_seeded(brand):
    split = brand.split()
    assert split == load_brand("yuansu").split()
    assert not set(split["train"]) & set(split["val"])
    assert set(split["train"]) | set(split["val"]) == set(brand.products)
    assert len(split["val"]) >= 0.15 * len(brand.products)
    brand_other_seed = load_brand("yuansu")
    brand_other_seed.split_seed += 1
    assert brand_other_seed.split()["val"] != split["val"]


def test_load_brand_accepts_a_folder_path(brand_copy):
    assert load_brand(brand_copy).products.keys() == load_brand("yuansu").products.keys()


def test_missing_file_is_named(brand_copy):
    (brand_copy / "products.jsonl").unlink()
    with pytest.raises(BrandDataError, match="missing products.jsonl"):
        load_brand(brand_copy)


def test_unknown_brand_is_an_error():
    with pytest.raises(BrandDataError, match="no brand folder"):
        load_brand("no-such-brand")


def test_malformed_yaml_names_file_and_line(brand_copy):
    path = brand_copy / "brand.yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[20] = "name: [unclosed"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"brand\.yaml:\d+: malformed YAML") as err:
        load_brand(brand_copy)
    assert err.value.line is not None


def test_missing_yaml_field_names_field(brand_copy):
    path = brand_copy / "brand.yaml"
    text = path.read_text(encoding="utf-8").replace("philosophy: 精简有效，回归肌肤本源\n", "")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"brand\.yaml:\d+: field 'philosophy': missing field"):
        load_brand(brand_copy)


def test_val_fraction_below_minimum_is_rejected(brand_copy):
    path = brand_copy / "brand.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("val_fraction: 0.2", "val_fraction: 0.1"), encoding="utf-8")
    with pytest.raises(BrandDataError, match="split.val_fraction"):
        load_brand(brand_copy)


def _edit_product_line(folder, index, edit):
    path = folder / "products.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[index] = edit(lines[index])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_malformed_jsonl_line_is_named(brand_copy):
    _edit_product_line(brand_copy, 4, lambda line: line[:-5])
    with pytest.raises(BrandDataError, match=r"products\.jsonl:5: malformed JSON line"):
        load_brand(brand_copy)


@pytest.mark.parametrize("field,edit,message", [
    ("price", lambda p: p.pop("price"), "missing field"),
    ("composition[0].materials[0].name", lambda p: p["composition"][0]["materials"][0].update(name="不存在的成分"), "not a material"),
    ("composition[0].materials[0].share", lambda p: p["composition"][0]["materials"][0].update(share="五%"), "expected a percentage"),
    ("composition[0].materials[0].share", lambda p: p["composition"][0]["materials"][0].update(share=120), "expected a percentage"),
    ("facts.registration", lambda p: p["facts"].update(registration="药品"), "expected one of"),
    ("facts.registration", lambda p: p["facts"].pop("registration"), "missing field"),
    ("facts.spf", lambda p: p["facts"].update(spf="高"), "expected a number"),
    ("facts.colour", lambda p: p["facts"].update(colour="白"), "not a fact"),
    ("claims", lambda p: p.update(claims=["包治百病"]), "not a canonical claim"),
    ("name", lambda p: p.update(name="  "), "empty text"),
])
def test_bad_product_field_is_named(brand_copy, field, edit, message):
    def change(line):
        product = json.loads(line)
        edit(product)
        return json.dumps(product, ensure_ascii=False)

    _edit_product_line(brand_copy, 2, change)
    with pytest.raises(BrandDataError, match=rf"products\.jsonl:3: field '{re.escape(field)}'.*{message}"):
        load_brand(brand_copy)


def test_bad_content_types_file(tmp_path):
    path = tmp_path / "content_types.yaml"
    path.write_text("paid_ad_pas:\n  family: radio\n", encoding="utf-8")
    with pytest.raises(BrandDataError, match=r"content_types\.yaml:2: field 'paid_ad_pas\.family'"):
        load_content_types(path)


@pytest.mark.parametrize("record,field", [
    ({"content_type": "paid_ad_fab"}, "text"),
    ({"text": "  ", "content_type": "paid_ad_fab"}, "text"),
    ({"text": "文案", "content_type": "radio_ad"}, "content_type"),
    ({"text": "文案", "content_type": "paid_ad_fab", "product_id": "YS-999"}, "product_id"),
])
def test_bad_records_name_line_and_field(brand, tmp_path, record, field):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"text": "文案", "content_type": "paid_ad_fab"}, ensure_ascii=False)
    path.write_text(good + "\n" + json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(BrandDataError, match=rf"in\.jsonl:2: field '{field}'"):
        read_records(path, brand)


def test_instruction_carries_the_facts(brand):
    text = build_instruction(brand, "YS-010", "paid_ad_fab")
    assert text == build_instruction(brand, "YS-010", "paid_ad_fab")
    product = brand.product("YS-010")
    assert product.name in text and brand.content_type("paid_ad_fab").name_zh in text
    assert "烟酰胺 5%" in text and "锌PCA 1%" in text and "浓度未公开" in text
    assert all(claim in text for claim in product.claims)
    assert brand.cta_phrases[0] in text
    assert brand.cta_phrases[0] not in build_instruction(brand, "YS-010", "social_media_review")
    sunscreen = build_instruction(brand, "YS-031", "paid_ad_pas")
    assert "防晒指数（SPF）：50+" in sunscreen and "PA等级：++++" in sunscreen and "管理类别：特殊化妆品（防晒）" in sunscreen


def test_chat_messages_roles(brand):
    prompt = chat_messages(brand, "YS-001", "social_media_review")
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert brand.philosophy in prompt[0]["content"] == system_prompt(brand)
    full = chat_messages(brand, "YS-001", "social_media_review", text="文案")
    assert full[-1] == {"role": "assistant", "content": "文案"} and full[:2] == prompt
    with pytest.raises(KeyError, match="YS-999"):
        chat_messages(brand, "YS-999", "social_media_review")


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden.jsonl not written yet")
def test_golden_set_covers_products_types_and_val(brand):
    golden = load_golden(brand)
    assert len(golden) >= 180
    assert len({r["id"] for r in golden}) == len(golden)
    types_per_product = {}
    for record in golden:
        types_per_product.setdefault(record["product_id"], set()).add(record["content_type"])
        assert record["instruction"] == build_instruction(brand, record["product_id"], record["content_type"]), record["id"]
    complete = [pid for pid, types in types_per_product.items() if types == set(TYPES)]
    assert len(complete) >= 20
    assert set(brand.split()["val"]) & set(complete)
