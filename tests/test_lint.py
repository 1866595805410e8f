"""lint: each check with texts that must and must not trigger it, the fact check, scoring, the
golden set, corruptions of good copy, lint_file and the ``brandcopy lint`` command."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from brandcopy.brand import BrandDataError, load_brand, load_golden
from brandcopy.cli import app
from brandcopy.lint import FACT_KINDS, RULE_KINDS, lint_file, lint_records, lint_text, normalize, score

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "data" / "brands" / "yuansu" / "golden.jsonl"
# Neutral filler that brings a snippet into the social length range without triggering anything.
PAD = "这段文字只用于补足篇幅，内容保持中性。" * 14

GOOD_COPY = [
    ('YS-010', 'social_media_educational', """烟酰胺的浓度，是不是越高越好？

烟酰胺即维生素B3，是研究较充分的护肤成分之一。它参与调节皮脂分泌，也有助于促进角质层中神经酰胺等脂质的合成，因此常被用于油性肌肤的日常护理。但浓度与耐受度密切相关：浓度过高时，部分人会出现泛红、刺痒等不适。

原素方程烟酰胺5%均衡精华液，把烟酰胺浓度定在5%，在控油效果与日常耐受之间取一个平衡点；同时加入1%锌PCA，协同调节油脂；多分子量透明质酸钠负责补水保湿，让油皮在控油的同时不缺水。

使用建议：早晚洁面、爽肤后取2至3滴于全脸，轻按至吸收，再用乳液或面霜。初次接触烟酰胺的人，建议从隔日使用开始，先在耳后试用，观察24小时无不适再用于全脸。

精简的配方，清楚的浓度，是我们对每一支精华的要求。"""),
    ('YS-016', 'social_media_myth_busting', """“A醇刺激大，敏感一点的人最好别碰。”这是一个常见的误区。

视黄醇带来的不适，多半与浓度和使用节奏有关，而不是成分本身“不能用”。皮肤需要时间适应视黄醇：第一周就每晚大面积使用高浓度产品，出现干燥、脱屑的概率自然更高。

更科学的做法是从低浓度开始，逐步建立耐受。原素方程视黄醇0.1%初阶抗皱精华，正是为初次使用者设计：0.1%视黄醇作为入门浓度；0.2%红没药醇帮助维持肌肤舒适；5%角鲨烷提供柔润的油乳质地，减少建立耐受期间的干燥感。

用法上，只在晚间使用，洁面后待面部完全干燥，取1泵薄涂全脸，避开眼周与唇周。第1至2周每周2次，之后逐步增加到隔日或每晚。白天务必做好防晒，孕期及哺乳期请勿使用。

耐受是一步一步建立的，抗皱也需要耐心和规律。"""),
    ('YS-031', 'paid_ad_pas', """通勤十分钟也会晒黑？紫外线中的UVA穿透力强，阴天和窗边同样存在，日积月累会让肤色不均、细纹提前出现。原素方程清透水感防晒乳 SPF50+ PA++++，以双-乙基己氧苯酚甲氧苯基三嗪等四种防晒剂组合，广谱防晒，水感质地成膜轻薄。点击下方链接了解配方详情。"""),
    ('YS-026', 'ecommerce_long_form', """原素方程神经酰胺屏障修护霜：为干燥、敏感和屏障受损的肌肤设计的一支精简面霜。

核心成分
皮肤屏障的“砖墙结构”里，角质细胞是砖，细胞间脂质是泥。细胞间脂质主要由神经酰胺、胆固醇和脂肪酸组成。这支面霜的配方从这一源头出发：
1. 神经酰胺 1%：神经酰胺NP、AP、EOP复合，补充屏障脂质的关键组分。
2. 胆甾醇 0.5%：即胆固醇，与神经酰胺协同，帮助维持脂质结构的完整。
3. 角鲨烷 5%：稳定的亲肤油脂，减少水分散失，带来柔润肤感。
4. 乳木果油 3%：提供滋养，适合干燥季节。
规律使用有助于修护屏障、保湿和滋养肌肤。

质地与肤感
丰润的面霜质地，体温即可化开，推开后贴肤，不厚重。

适用肤质
干性肌肤、敏感肌肤，以及因换季或过度清洁导致屏障受损的肌肤。

使用方法
早晚护肤的最后一步，取黄豆大小于全脸轻推至吸收；干燥季节可在干燥部位局部加量。

注意事项
首次使用前建议在耳后或下颌处试用，观察24小时无不适再用于全脸。

规格与价格
50g，229元。

精简有效，回归肌肤本源。我们只放入屏障真正需要的成分，并把浓度写清楚。"""),
    ('YS-002', 'paid_ad_fab', """0.5%水杨酸＋氨基酸表面活性剂：水杨酸是脂溶性的，能进入毛孔帮助代谢老废角质，氨基酸体系清洁温和。油性、混合性肌肤每天晚间用它洁面，T区停留约20秒再冲净，帮助控油、减少毛孔堵塞。含水杨酸，三岁以下儿童勿用。前往旗舰店查看完整成分表。"""),
    ('YS-011', 'paid_ad_bab', """痘印和晒后色沉，让肤色看起来不均匀。规律使用8周后，肤色可以更均匀、透亮。原素方程传明酸3%烟酰胺5%焕白精华，以3%氨甲环酸与5%烟酰胺协同淡斑、美白，早晚2至3滴，白天配合防晒。点击链接领取试用装，先在耳后试用。"""),
    ('YS-007', 'social_media_review', """我是混合偏干的敏感肌，换季时两颊容易泛红，这次用积雪草舒缓精粹水整整四周，记录一下真实感受。

质地是清爽的水状，没有香精的味道，拍在脸上几秒就吸收，不黏手。成分表很短：1%积雪草提取物、0.2%甘草酸二钾和0.2%尿囊素，都是舒缓方向的经典成分。

我的用法：早晚洁面后倒在掌心轻拍全脸；两颊泛红比较明显的那几天，用化妆棉湿敷5分钟。第一周变化不大，第二周开始，洗完脸后的紧绷感和刺痒感减轻了；泛红没有消失，但持续的时间短了一些。保湿力属于基础水平，秋冬我会在后面叠加面霜。

适合谁：敏感肌、容易泛红的人，想要一瓶成分简单的水。不太适合：需要强力控油或者希望一瓶水解决所有干燥问题的人。另外，首次使用前最好先在耳后试用一天。

总结一下，它做的事情不多，但把舒缓和保湿做得踏实。"""),
    ('YS-001', 'paid_ad_cta', """护肤的第一步是洁面。原素方程氨基酸温和洁面乳，以氨基酸表面活性剂温和清洁，加入1%泛醇，洗后不紧绷，干性与敏感肌肤也适用。120g，89元。点击链接领取试用装，先在耳后试用。"""),
    ('YS-034', 'social_media_storytelling', """研发这支身体防晒乳时，我们问过一百多位用户同一个问题：为什么身体防晒总是坚持不下来？答案几乎一致：太黏、太难推开、涂完衣服粘在身上。

所以这次的取舍很明确。我们没有追求更多的防晒剂种类，而是选择了三种成熟的组合：7.5%甲氧基肉桂酸乙基己酯、2%双-乙基己氧苯酚甲氧苯基三嗪和3%二乙氨羟苯甲酰基苯甲酸己酯，达到SPF50 PA+++，同时把质地做成清爽易推开的乳液。150ml的容量，是按手臂、颈部和小腿每天足量涂抹来计算的。

一位每天骑车通勤的用户告诉我们，她现在出门前15分钟涂一次，中午再补涂一次，夏天结束时手臂没有明显的色差。这正是我们想要的结果：不是靠更复杂的配方，而是让正确的防晒变得容易坚持。

精简有效，回归肌肤本源。把防晒做好，本身就是基础的护理。"""),
]


@pytest.fixture(scope="module")
def brand():
    return load_brand("yuansu")


def kinds(brand, snippet, product_id="YS-010", content_type="social_media_educational"):
    """The violation kinds of a snippet padded to a valid social length."""
    return lint_text(brand, snippet + PAD, content_type, product_id).kinds()


@pytest.mark.parametrize("product_id,content_type,text", GOOD_COPY)
def test_good_copy_is_clean(brand, product_id, content_type, text):
    result = lint_text(brand, text, content_type, product_id)
    assert result.violations == () and result.score == 1.0


@pytest.mark.parametrize("snippet", [
    "规格100ml，价格149元。", "１００ml装。", "洁面是护肤的第一步。", "第一次使用时先在耳后试用。", "最近换季，两颊有些干。",
    "最后一步涂面霜。", "最好在晚上使用。", "每周最多使用2次。", "最多2滴就够了。", "pH值约5.5。",
    "最常见的误区是浓度越高越好。", "这个说法并不绝对。", "两颊有红血丝的敏感肌。",
])
def test_legitimate_numbers_and_usage_words_pass(brand, snippet):
    assert kinds(brand, snippet) == set()


@pytest.mark.parametrize("snippet,kind", [
    ("真是护肤神器。", "forbidden_word"), ("YYDS。", "forbidden_word"), ("ｙｙｄｓ。", "forbidden_word"),
    ("Y Y D S。", "forbidden_word"), ("神 器。", "forbidden_word"), ("家人们看过来。", "forbidden_word"),
    ("绝绝子。", "forbidden_word"), ("效果绝对好。", "absolute_claim"), ("祛红血丝。", "absolute_claim"), ("闭眼入。", "forbidden_word"), ("用了会烂脸吗？", "forbidden_word"),
    ("最好的精华。", "absolute_claim"), ("最有效的配方。", "absolute_claim"), ("全网销量第一。", "absolute_claim"),
    ("销量NO.1。", "absolute_claim"), ("100%有效。", "absolute_claim"), ("１００％有效。", "absolute_claim"),
    ("根治出油。", "absolute_claim"), ("效果永久。", "absolute_claim"), ("国家级配方。", "absolute_claim"),
    ("立刻见效。", "absolute_claim"), ("无任何副作用。", "absolute_claim"), ("7天见效。", "absolute_claim"),
    ("医学护肤。", "absolute_claim"), ("能治疗痘痘。", "absolute_claim"), ("纯天然成分。", "absolute_claim"),
    ("好用!!", "exclamation"), ("好用！！", "exclamation"), ("好用！真的好用!", "exclamation"),
    ("【标题】控油精华", "markup"), ("**重点**", "markup"), ("# 控油\n", "markup"), ("换行<br>", "markup"),
    ("Title: 控油\n", "markup"), ("文案：控油\n", "markup"), ("以下是为您撰写的小红书文案：\n", "markup"),
    ("- 要点一\n", "markup"), ("<|im_end|>", "markup"), ("（约300字）", "markup"),
])
def test_rule_violations_are_caught(brand, snippet, kind):
    assert kind in kinds(brand, snippet)


def test_one_exclamation_mark_is_allowed(brand):
    assert kinds(brand, "值得一试！") == set()


@pytest.mark.parametrize("snippet,kind", [
    ("加入了视黄醇。", "unknown_material"), ("搭配神经酰胺。", "unknown_material"), ("含有维C衍生物。", "unknown_material"),
    ("温和无刺激的配方加入了A醇。", "unknown_material"), ("10%烟酰胺。", "wrong_share"),
    ("烟酰胺10%。", "wrong_share"), ("烟酰胺（10%）。", "wrong_share"), ("浓度为2%的烟酰胺。", "wrong_share"),
    ("透明质酸钠1%。", "wrong_share"), ("帮助美白。", "unsupported_claim"), ("淡化痘印。", "unsupported_claim"),
    ("有效抗皱。", "unsupported_claim"), ("不是遮盖而是美白。", "unsupported_claim"), ("SPF50+。", "wrong_fact"),
    ("PA++++。", "wrong_fact"), ("特殊化妆品（防晒）。", "wrong_fact"),
])
def test_fact_check_catches(brand, snippet, kind):
    assert kind in kinds(brand, snippet)


@pytest.mark.parametrize("snippet", [
    "配方不含酒精、香精。", "无香精配方。", "酒精与香精均未添加。", "不添加任何香精。", "角质层中的神经酰胺会随年龄流失。",
    "5%烟酰胺搭配1%锌PCA。", "烟酰胺（5%）。", "烟酰胺浓度为5%。", "浓度5%的烟酰胺。", "维生素B3（烟酰胺）。",
    "它并不是美白产品。", "它不能直接美白。", "白天做好防晒。", "白天搭配SPF30以上的防晒霜。", "避免过度去角质。", "洁面后及时保湿。",
    "之后涂一层保湿霜。", "避免与视黄醇、果酸等同晚使用。", "与A醇错开使用。", "有人担心烟酰胺不能和维C一起用。",
])
def test_fact_check_passes(brand, snippet):
    assert kinds(brand, snippet) == set()


# --- false positives the copywriters reported, each with the true positives it must keep -----


@pytest.mark.parametrize("snippet", [
    "第一类是氨基酸表面活性剂。", "原因有两个。第一，功效并不随浓度线性增长。", "这里有两处误解。第一处是机理。",
    "记录本，第一页写着一句话。", "有人第一反应是：这是从尿里提取的吗？", "第一，浓度要合适。",
])
def test_ordinal_first_passes(brand, snippet):
    assert kinds(brand, snippet, "YS-001") == set()


@pytest.mark.parametrize("snippet", ["销量第一。", "第一品牌。", "行业第一。", "全网第一。", "全网第一，值得信赖。", "销量第一名。"])
def test_ranking_first_is_caught(brand, snippet):
    assert kinds(brand, snippet) == {"absolute_claim"}


@pytest.mark.parametrize("snippet", ["乳木果油富含脂肪酸甘油酯。", "含有乙基己基甘油。", "添加聚甘油-10。", "含乳酸钠。"])
def test_ingredient_inside_a_longer_chemical_name_passes(brand, snippet):
    assert kinds(brand, snippet, "YS-026") == set()


@pytest.mark.parametrize("snippet", ["加入甘油。", "甘油、脂肪酸。", "含乳酸。"])
def test_ingredient_standing_alone_is_caught(brand, snippet):
    assert kinds(brand, snippet, "YS-026") == {"unknown_material"}


@pytest.mark.parametrize("snippet,clean", [
    ("不加香精。", True), ("不含有酒精。", True), ("不含有酒精和香精。", True), ("加香精。", False), ("含有酒精。", False),
])
def test_negation_forms(brand, snippet, clean):
    assert kinds(brand, snippet) == (set() if clean else {"unknown_material"})


@pytest.mark.parametrize("snippet,clean", [
    ("控油、去角质这些需求交给其他步骤。", True), ("控油的需求可以交给其他产品，它负责保湿。", True), ("它不负责控油。", True),
    ("它并不主打控油。", True), ("控油交给它就好。", False), ("它主打控油。", False), ("这些需求交给其他产品：控油、去角质。", False),
])
def test_claim_left_to_other_products(brand, snippet, clean):
    assert kinds(brand, snippet, "YS-005") == (set() if clean else {"unsupported_claim"})


@pytest.mark.parametrize("snippet,clean", [
    ("神经酰胺NP中的P指植物鞘氨醇骨架。", True), ("加入植物鞘氨醇。", False), ("另含0.2%植物鞘氨醇。", False),
])
def test_molecular_building_block_is_not_an_ingredient(brand, snippet, clean):
    assert kinds(brand, snippet, "YS-026") == (set() if clean else {"unknown_material"})


def test_every_kind_is_declared(brand):
    text = "神器！！【标题】最好的精华，加入视黄醇，10%烟酰胺，帮助美白。"
    result = lint_text(brand, text, "paid_ad_cta", "YS-010")
    assert result.kinds() == set(RULE_KINDS) | (FACT_KINDS - {"wrong_fact"})
    assert lint_text(brand, "SPF30", "paid_ad_cta", "YS-031").kinds() == {"wrong_fact", "missing_cta", "length"}


def test_fact_check_needs_product_id(brand):
    assert lint_text(brand, "加入了视黄醇，帮助美白。" + PAD, "social_media_educational").clean


def test_spf_and_pa_must_match(brand):
    assert kinds(brand, "SPF50+ PA++++。", "YS-031") == set()
    assert kinds(brand, "SPF30 PA++++。", "YS-031") == {"wrong_fact"}
    assert kinds(brand, "SPF50+ PA++。", "YS-031") == {"wrong_fact"}
    assert kinds(brand, "SPF50 PA++++。", "YS-031") == {"wrong_fact"}  # 50 is not 50+


def test_length_and_cta(brand):
    ad = "5%烟酰胺搭配1%锌PCA，帮助油性与混合性肌肤控油，多分子量透明质酸钠补水保湿，质地轻薄、吸收迅速，早晚2至3滴即可。"
    assert lint_text(brand, ad, "paid_ad_fab", "YS-010").kinds() == {"missing_cta"}
    assert lint_text(brand, ad + "点击下方链接了解配方详情。", "paid_ad_fab", "YS-010").clean
    assert lint_text(brand, ad + "前往旗舰店查看完整成分表。", "paid_ad_fab", "YS-010").clean
    assert lint_text(brand, ad + "前往旗舰店查看完整成分表。", "social_media_review", "YS-010").kinds() == {"length"}
    assert lint_text(brand, ad, "social_media_review", "YS-010").kinds() == {"length"}  # no CTA needed outside ads
    assert lint_text(brand, (ad * 4) + "点击下方链接了解配方详情。", "paid_ad_fab", "YS-010").kinds() == {"length"}


def test_length_ignores_whitespace(brand):
    text = "控" * 200
    assert lint_text(brand, text, "social_media_review").clean
    assert lint_text(brand, " \n".join(text[:199]), "social_media_review").kinds() == {"length"}


def test_spans_index_the_original_text(brand):
    text = "好用！！ＹＹＤＳ，１００％有效，加入视黄醇。" + PAD
    result = lint_text(brand, text, "social_media_educational", "YS-010")
    assert result.kinds() == {"exclamation", "forbidden_word", "absolute_claim", "unknown_material"}
    for violation in result.violations:
        assert text[violation.span[0]:violation.span[1]] == violation.text
    assert [v.text for v in result.violations] == ["！", "ＹＹＤＳ", "１００％", "视黄醇"]
    assert len(normalize(text)) == len(text)


def test_score_formula(brand):
    assert score([]) == 1.0
    result = lint_text(brand, "神器！！", "paid_ad_cta", "YS-010")
    assert len(result.violations) == 4  # forbidden_word, exclamation, missing_cta, length
    assert result.score == pytest.approx(1 / 5)
    assert lint_text(brand, "神器！！", "paid_ad_cta", "YS-010") == result  # deterministic


def test_lint_records_matches_lint_text(brand):
    records = [{"text": t, "content_type": c, "product_id": p} for p, c, t in GOOD_COPY[:3]] + [{"text": "神器", "content_type": "paid_ad_cta"}]
    results = lint_records(brand, records)
    assert [r.clean for r in results] == [True, True, True, False]


# --- corruptions of good copy (and of the golden set once it exists) ------------------------


def _golden_or_good(brand):
    if GOLDEN.exists():
        return [(r["product_id"], r["content_type"], r["text"]) for r in load_golden(brand)]
    return GOOD_COPY


def _swap_ingredient(brand, product_id, text):
    """Replaces a catalog ingredient name, everywhere in the text, with one no product contains."""
    names = [m.name for m in brand.product(product_id).materials if m.name in text]
    return text.replace(names[0], "熊果苷") if names else None


def _change_concentration(brand, product_id, text):
    """Changes a catalog concentration written right next to its ingredient."""
    for material in brand.product(product_id).materials:
        c = f"{material.share:g}%" if material.share is not None else None
        for form in (f"{c}{material.name}", f"{material.name}{c}", f"{material.name} {c}", f"{c}的{material.name}"):
            if c and form in text:
                wrong = f"{material.share * 2 + 1:g}%"
                return text.replace(form, form.replace(c, wrong), 1)
    return None


def _drop_cta(brand, text):
    patterns = [re.compile(p) for p in brand.cta_patterns]
    sentences = re.split(r"(?<=[。！？!?\n])", text)
    return "".join(s for s in sentences if not any(p.search(normalize(s)) for p in patterns))


def test_corrupted_copy_is_caught(brand):
    samples = _golden_or_good(brand)
    swapped = changed = dropped = 0
    for product_id, content_type, text in samples:
        middle = len(text) // 2
        assert "forbidden_word" in lint_text(brand, text[:middle] + "神器" + text[middle:], content_type, product_id).kinds()
        corrupted = _swap_ingredient(brand, product_id, text)
        if corrupted:
            swapped += 1
            assert "unknown_material" in lint_text(brand, corrupted, content_type, product_id).kinds(), corrupted
        corrupted = _change_concentration(brand, product_id, text)
        if corrupted:
            changed += 1
            assert "wrong_share" in lint_text(brand, corrupted, content_type, product_id).kinds(), corrupted
        if brand.content_type(content_type).cta_required:
            dropped += 1
            assert "missing_cta" in lint_text(brand, _drop_cta(brand, text), content_type, product_id).kinds()
    assert min(swapped, changed, dropped) >= min(5, len(samples) // 4)


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden.jsonl not written yet")
def test_golden_set_lints_clean(brand):
    dirty = [(r["id"], [v.to_dict() for v in res.violations])
             for r, res in zip(load_golden(brand), lint_records(brand, load_golden(brand))) if not res.clean]
    assert dirty == []


# --- lint_file and the CLI ------------------------------------------------------------------


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _good_records():
    return [{"id": f"g{i}", "text": t, "content_type": c, "product_id": p} for i, (p, c, t) in enumerate(GOOD_COPY)]


def test_lint_file_validates_before_linting(brand, tmp_path):
    path = _write(tmp_path / "in.jsonl", _good_records())
    assert all(result.clean for _, _, result in lint_file(path, brand))
    with path.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(BrandDataError, match=rf"in\.jsonl:{len(GOOD_COPY) + 1}: malformed JSON line"):
        lint_file(path, brand)


def test_cli_exit_codes_and_json(tmp_path):
    runner = CliRunner()
    clean = _write(tmp_path / "clean.jsonl", _good_records())
    result = runner.invoke(app, ["lint", str(clean), "--json"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in _good_records()]
    assert all(line["violations"] == [] and line["score"] == 1.0 for line in lines)

    dirty = _write(tmp_path / "dirty.jsonl", _good_records()[:1] + [{"id": "bad", "text": "控油神器！！", "content_type": "paid_ad_cta"}])
    result = runner.invoke(app, ["lint", str(dirty), "--json", "--brand", "yuansu"])
    assert result.exit_code == 1
    bad = json.loads(result.stdout.splitlines()[1])
    assert bad["id"] == "bad" and 0 < bad["score"] < 1
    assert {"kind": "forbidden_word", "span": [2, 4], "text": "神器", "message": "品牌禁用词「神器」"} in bad["violations"]

    result = runner.invoke(app, ["lint", str(dirty)])
    assert result.exit_code == 1 and "⟦神器⟧" in result.stdout and "line 2 id=bad" in result.stdout


@pytest.mark.parametrize("bad_line,field", [
    ('{"text": "文案", "content_type": "radio"}', "content_type"),
    ('{"text": "", "content_type": "paid_ad_cta"}', "text"),
    ('{"text": "文案", "content_type": "paid_ad_cta", "product_id": "YS-999"}', "product_id"),
    ('{"content_type": "paid_ad_cta"}', "text"),
    ('{"text": "文案",', None),
])
def test_cli_bad_input_exits_2_without_output(tmp_path, bad_line, field):
    path = _write(tmp_path / "in.jsonl", _good_records())
    with path.open("a", encoding="utf-8") as f:
        f.write(bad_line + "\n")
    result = CliRunner().invoke(app, ["lint", str(path), "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"in.jsonl:{len(GOOD_COPY) + 1}:" in result.stderr
    if field:
        assert f"field '{field}'" in result.stderr


def test_cli_missing_brand_file(tmp_path):
    path = _write(tmp_path / "in.jsonl", _good_records())
    (tmp_path / "brand").mkdir()
    result = CliRunner().invoke(app, ["lint", str(path), "--brand", str(tmp_path / "brand")])
    assert result.exit_code == 2 and "missing brand.yaml" in result.stderr
