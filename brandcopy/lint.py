"""Rule checks and the fact check against the catalog: the one grader rewards and evaluation share.

``lint_text`` returns every violation with its kind, character span, offending text and a
Chinese message (the messages also serve as repair hints in data generation). Kinds:

- ``forbidden_word``: a banned word of brand.yaml, also in upper case, full-width or spaced out.
- ``absolute_claim``: a pattern of brand.yaml's ``absolute_claims`` (advertising law, medical terms);
  not inside quotation marks that the text refutes (“纯天然=无刺激”？并不成立).
- ``exclamation``: every exclamation mark after the first (half- or full-width).
- ``missing_cta``: a content type with ``cta_required`` and neither a shared imperative call to
  action (``CTA_IMPERATIVE``: 立即体验, 马上查看, …) nor a match of the brand's ``cta_patterns``.
- ``length``: characters (whitespace excluded) outside the content type's range.
- ``markup``: Markdown, HTML or special tokens, 【labels】, "标题："-style labels (not the content
  type's own structure labels, such as BAB's 之前/之后), preambles.

With a product_id, the fact check (the brand's and every product's name masked first):

- ``unknown_material``: a material of the brand's lexicon the product does not contain (not when
  negated: 不含酒精, 无香精, 酒精、香精均未添加; nor inside a longer name: 脂肪酸甘油酯).
- ``wrong_share``: a share bound to a product material (the percentage right before it, or right
  after it unless that one precedes the next material: 95%棉5%氨纶) that differs from the catalog,
  exceeds 100%, or is written for a material whose share the catalog does not disclose.
- ``unsupported_claim``: a claim-lexicon phrase whose canonical claim the product may not make
  (not when negated, given as advice or left to other products: 并非美白产品, 白天做好防晒,
  控油这类需求交给其他步骤).
- ``wrong_fact``: a typed fact of brand.yaml stated otherwise than the catalog: a number (with its
  unit) read after or before the fact's phrases, a value of an enum or set fact that the product
  does not have (not when negated or contrasted: 不同于重焙火), or a fact the product lacks.

Score (defined once, here): ``score = 1 / (1 + number of violations)``; 1.0 is clean, one
violation gives 0.5, three give 0.25. Checks run on a per-character NFKC-normalised, lower-cased
copy of the text, so spans index the original text and brand patterns see ``!`` for ``！``,
``,`` for ``，``, ``%`` for ``％``, ``(`` for ``（``. Rules are compiled once per Brand object.
"""

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from brandcopy.brand import Brand, CompositionSpec, ContentType, FactSpec, Material, Product, read_records

# The grader's vocabulary: every module that reads violation kinds imports them from here.
CTA_KIND = "missing_cta"
LENGTH_KIND = "length"
MARKUP_KIND = "markup"
EXAGGERATION_KINDS = frozenset({"forbidden_word", "absolute_claim", "exclamation"})  # what an exaggerated negative must trigger
RULE_KINDS = ("forbidden_word", "absolute_claim", "exclamation", CTA_KIND, LENGTH_KIND, MARKUP_KIND)
FACT_KINDS = frozenset({"unknown_material", "wrong_share", "unsupported_claim", "wrong_fact"})  # need a product_id

# The imperative calls to action copywriters use, shared by every brand; a brand adds its own
# with brand.yaml's cta_patterns (点击…链接, 领取试用装, …).
CTA_IMPERATIVE = (r"(?:立即|马上|现在|即刻|这就|赶快|快来|欢迎)\s*(?:去|来|就)?\s*(?:体验|查看|了解|咨询|领取|申领|下单|购买|订购|选购|入手"
                  r"|加入购物车|加购|预约|试用|试饮|试穿|收藏|关注|报名|到店|点击)")
_CLAUSE_END = "。!?;,:\n…"
_MARKUP = tuple((re.compile(pattern), label) for pattern, label in [
    (r"\*\*|__", "Markdown 加粗符号"),
    (r"(?m)^[ \t]{0,3}#{1,6}\s", "Markdown 标题符号"),
    (r"(?m)^[ \t]*[-*+][ \t]", "Markdown 列表符号"),
    (r"(?m)^[ \t]*>[ \t]", "Markdown 引用符号"),
    (r"```", "代码块符号"),
    (r"<\s*/?\s*[a-z][a-z0-9]*[^<>\n]{0,40}>", "HTML 标签"),
    (r"<\|[^|\n]{0,30}\|>", "模型特殊标记"),
    (r"【[^】\n]{1,12}】", "方括号标签"),
    (r"(?m)^[ \t]*(?:好的|当然|以下是|下面是|这是|这里是|为您|为你)[^\n。]{0,30}(?:文案|内容|版本|笔记|广告)", "生成说明"),
    (r"\(\s*(?:约|共|全文)?\s*\d+\s*字\s*\)|字数\s*:?\s*\d+", "字数标注"),
    (r"\{\{|\}\}|\{[a-z_]+\}|\[(?:产品名|品牌名|链接|价格|成分)\]|(?<![a-z])x{3,}(?![a-z])", "模板占位符"),
])
# Labels that a writer's draft leaves at the start of a line; a content type's own structure
# labels (content_types.yaml `labels`, e.g. BAB's 之前/之后) are left out for that type.
_LABEL_WORDS = ("标题", "副标题", "正文", "文案", "内容", "标签", "话题", "配图", "封面", "行动号召", "问题", "放大", "解决", "特性", "属性",
                "优势", "利益", "之前", "之后", "桥梁", "title", "subtitle", "body", "headline", "hook", "caption", "cta", "copy")
_PERCENT_AFTER = re.compile(
    r"^\s*(?:\([^()%\n]{0,20}\)\s*|\)\s*)?\(?\s*的?(?:浓度|含量|添加量|占比|比例)?\s*(?:为|达|是|高达|约为?|达到|占)?\s*(\d+(?:\.\d+)?)\s*%")
_PERCENT_BEFORE = re.compile(r"(\d+(?:\.\d+)?)\s*%\s*(?:浓度|含量|占比)?\s*的?\s*$")
_SHARE_GAP = re.compile(r"^[\s的]*")
_NEGATION = re.compile(
    r"不含|不添加|未添加|没有添加|无添加|零添加|不加|未加|没加|不使用|未使用|没有使用|剔除|去除了|摒弃|拒绝|不是|并非|而非|区别于|不同于"
    r"|没有|无|免|零|(?<![\d.])0(?![\d.%])"
    # advice to keep another material apart is not a claim that the product contains it
    r"|避免与|避免和|不要与|不要和|不建议与|不建议和|别与|别和|勿与|不宜与|不能与|不能和|不可与|错开")
_NEGATION_AFTER = re.compile(
    r"^[\s、,和与及或/]*(?:均|都|也|皆|一律)?(?:未|不|没有|零|无)(?:添加|含|使用)|^等?类?(?:产品)?(?:错开|分开|分早晚|间隔)")
# a value of an enum or set fact that the text contrasts with the product's own: 不同于重焙火, 比起玻璃杯
_CONTRAST = re.compile(r"不|没|无|非|别|勿|忌|未|相比|比起|对比|比|区别于|不像|不同于|除了|以外")
_CONTRAST_AFTER = re.compile(r"^[^,。;:!?\n]{0,8}?(?:不同|不一样|有别|相比|那样|之外|以外)")
_AFFIRM = re.compile(r"而是|但|却|就是|正是")
_FILLER = re.compile(r"[\s、,和与及或/]|以及|或者|任何|额外|添加|含有|使用|的")
_CLAIM_EXEMPT = re.compile(
    r"不能|无法|不会|并不|并非|不是|不主打|不宣称|没有|不具备|不可|不做|不承诺|不等于|不代表|避免|不要|别|过度|频繁|过量|无需|不必|不用"
    r"|不负责|不针对|不承担|不含|不添加|做好|注意|加强|及时|搭配|配合|记得|叠加|后续|再做|另外|需要|需|建议|同时|加上|辅以")
# a claim phrase naming a step ("保湿步骤") is not a claim; a brand adds its product nouns (claim_noun_after)
_CLAIM_NOUN_AFTER = re.compile(r"^(?:步骤|工作|环节|措施)")
# a need handed to another product or step: 控油、去角质这些需求交给其他步骤
_CLAIM_DEFERRED_AFTER = re.compile(
    r"^(?:等|这些|这类|这种|这样的|之类的?)*(?:需求|需要|功能|功效|诉求|任务|工作|问题)?(?:就|可以|可|请|不妨|则)?(?:交给|留给|交由|让给)"
    r"(?:其他|其它|别的|另外的?|专门的?|其余的?)")
_CLAIM_CONTRAST = re.compile(r"而是|但|却|而|还能|也能")
_CLAIM_FILLER = re.compile(r"[\s、,和与及或/的]")
_NUMBER_VALUE = r"(\d+(?:\.\d+)?)\s*(\+?)(?:\s*(?:-|–|—|~|至|到)\s*(\d+(?:\.\d+)?))?"
_NUMBER_LEAD = r"\s*(?:\(|:)?\s*(?:的)?\s*(?:约为?|为|是|在|达到?|高达|控制在|保持在|大约|大概|约在|:|\s)*\s*"
_EXCLAMATION = re.compile(r"!")
# quoted words the text refutes are not the brand's claim: “纯天然=无刺激”？并不成立。
_QUOTES = {"“": "”", '"': '"', "「": "」", "‘": "’", "『": "』"}
_REFUTE_AFTER = re.compile(r"并不成立|不成立|站不住|是误区|是个误区|是一个误区|误区|是谣言|谣言|不对|是错的|错误|并非如此|未必|不等于|不是这样|经不起|并不")
_REFUTE_BEFORE = re.compile(r"误区|谣言|误以为|误解|错觉|所谓|以讹传讹")
_MASK = "\x00"


@dataclass(frozen=True)
class Violation:
    """One rule violation; ``span`` is ``(start, end)`` into the original text."""

    kind: str
    span: tuple[int, int]
    text: str
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "span": list(self.span), "text": self.text, "message": self.message}


@dataclass(frozen=True)
class LintResult:
    """All violations of one text and its score in [0, 1] (1.0 when clean)."""

    violations: tuple[Violation, ...]
    score: float

    @property
    def clean(self) -> bool:
        return not self.violations

    def kinds(self) -> set[str]:
        """The set of violation kinds present."""
        return {v.kind for v in self.violations}


def copy_length(text: str) -> int:
    """Characters of the copy, whitespace excluded: how content_types.yaml defines length."""
    return sum(1 for c in text if not c.isspace())


def score(violations: list[Violation]) -> float:
    """The lint score: ``1 / (1 + len(violations))``, in (0, 1], 1.0 when clean."""
    return 1.0 / (1.0 + len(violations))


def normalize(text: str) -> str:
    """NFKC + lower-case per character, keeping one character per character so spans survive."""
    return "".join(_normalize_char(c) for c in text)


@lru_cache(maxsize=4096)
def _normalize_char(char: str) -> str:
    folded = unicodedata.normalize("NFKC", char).lower()
    return folded if len(folded) == 1 else char.lower()


# --- compiled rules -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rules:
    banned: tuple[tuple[str, re.Pattern], ...]
    absolute: tuple[tuple[re.Pattern, str], ...]
    cta: re.Pattern
    names: re.Pattern
    materials: re.Pattern
    alias_to_material: dict
    claims: re.Pattern
    phrase_to_claim: dict
    claim_noun_after: re.Pattern | None
    numbers: tuple  # (FactSpec, phrase pattern, after pattern, before pattern)
    values: re.Pattern | None  # every phrase of every enum and set value
    phrase_to_value: dict  # normalised phrase -> (fact id, value)
    endogenous_before: re.Pattern | None
    endogenous_after: re.Pattern | None
    compound_before: re.Pattern | None
    compound_after: re.Pattern | None


def _term_pattern(term: str, spaced: bool = False, number_after: bool = False) -> str:
    """Regex for a normalised term; ASCII edges get word boundaries, ``spaced`` allows 'Y Y D S',
    ``number_after`` lets a number follow directly (SPF50)."""
    chars = [re.escape(c) for c in normalize(term)]
    body = r"[\s·・.\-_*]*".join(chars) if spaced else "".join(chars)
    head = r"(?<![a-z0-9])" if term[0].isascii() and term[0].isalnum() else ""
    tail = (r"(?![a-z])" if number_after else r"(?![a-z0-9])") if term[-1].isascii() and term[-1].isalnum() else ""
    return head + body + tail


def _alternation(terms: Iterable[str], number_after: bool = False) -> re.Pattern:
    """One regex matching any term, longest first so that 水杨酸乙基己酯 wins over 水杨酸."""
    ordered = sorted(set(terms), key=lambda t: (-len(t), t))
    return re.compile("|".join(_term_pattern(t, number_after=number_after) for t in ordered) or r"(?!x)x")


def _optional(pattern: str | None) -> re.Pattern | None:
    return re.compile(pattern) if pattern else None


def _number_patterns(spec: FactSpec) -> tuple[re.Pattern, re.Pattern | None]:
    """(after, before) regexes of a number fact: ``海拔约1200米`` / ``1200米的海拔``; before needs a unit."""
    units = "|".join(re.escape(normalize(u)) for u in sorted(spec.units, key=len, reverse=True))
    after = re.compile(_NUMBER_LEAD + _NUMBER_VALUE + (rf"\s*(?:{units})" if units else r"(?![\d.%])"))
    before = re.compile(_NUMBER_VALUE + rf"\s*(?:{units})\s*(?:左右|以上)?\s*的?\s*$") if units else None
    return after, before


@lru_cache(maxsize=16)
def _rules(brand: Brand) -> _Rules:
    """Compiles the brand's rules once; Brand hashes by identity."""
    composition = brand.composition
    alias_to_material = {}
    for entry in composition.materials.values():
        for alias in (entry.name, *entry.aliases):
            alias_to_material[normalize(alias)] = entry.name
    phrase_to_claim = {normalize(p): claim for claim, phrases in brand.claim_lexicon.items() for p in phrases}
    phrase_to_value = {normalize(phrase): (spec.id, value) for spec in brand.facts.values() if spec.type in ("enum", "set")
                       for value, phrases in spec.values.items() for phrase in phrases}
    numbers = tuple((spec, _alternation(spec.phrases, number_after=True), *_number_patterns(spec)) for spec in brand.facts.values() if spec.type == "number")
    noun_after = "|".join(f"(?:{p})" for p in (_CLAIM_NOUN_AFTER.pattern, brand.claim_noun_after) if p)
    return _Rules(
        banned=tuple((w, re.compile(_term_pattern(w, spaced=True))) for w in brand.banned_words),
        absolute=tuple((re.compile(p), reason) for p, reason in brand.absolute_claims),
        cta=re.compile("|".join(f"(?:{p})" for p in (CTA_IMPERATIVE, *brand.cta_patterns))),
        names=_alternation([brand.name, brand.name_en, *(p.name for p in brand.products.values())]),
        materials=_alternation(alias_to_material),
        alias_to_material=alias_to_material,
        claims=_alternation(phrase_to_claim),
        phrase_to_claim=phrase_to_claim,
        claim_noun_after=re.compile(noun_after),
        numbers=numbers,
        values=_alternation(phrase_to_value) if phrase_to_value else None,
        phrase_to_value=phrase_to_value,
        endogenous_before=_optional(composition.endogenous_before),
        endogenous_after=_optional(composition.endogenous_after),
        compound_before=_optional(composition.compound_before),
        compound_after=_optional(composition.compound_after),
    )


@lru_cache(maxsize=16)
def _label_markup(allowed: tuple[str, ...]) -> re.Pattern:
    """The line-start label rule without the content type's own structure labels."""
    words = "|".join(w for w in _LABEL_WORDS if w not in allowed)
    return re.compile(rf"(?m)^[ \t]*(?:{words})[ \t]*:")


# --- rule checks --------------------------------------------------------------------------


def _violation(text: str, kind: str, start: int, end: int, message: str) -> Violation:
    return Violation(kind, (start, end), text[start:end], message)


def _check_banned(text: str, norm: str, rules: _Rules) -> list[Violation]:
    return [_violation(text, "forbidden_word", m.start(), m.end(), f"品牌禁用词「{word}」")
            for word, pattern in rules.banned for m in pattern.finditer(norm)]


def _quoted_and_refuted(norm: str, start: int, end: int) -> bool:
    """True when ``start:end`` lies inside quotation marks that the text around them refutes."""
    for opening, closing in _QUOTES.items():
        left = norm.rfind(opening, max(0, start - 40), start)
        if left == -1 or (opening != closing and closing in norm[left + 1:start]) or (opening == closing and norm[:left].count(opening) % 2):
            continue
        right = norm.find(closing, end, end + 40)
        if right == -1:
            continue
        if _REFUTE_AFTER.search(norm[right + 1:right + 30]) or _REFUTE_BEFORE.search(norm[max(0, left - 12):left]):
            return True
    return False


def _check_absolute(text: str, norm: str, rules: _Rules) -> list[Violation]:
    return [_violation(text, "absolute_claim", m.start(), m.end(), reason)
            for pattern, reason in rules.absolute for m in pattern.finditer(norm) if not _quoted_and_refuted(norm, m.start(), m.end())]


def _check_exclamation(text: str, norm: str) -> list[Violation]:
    marks = list(_EXCLAMATION.finditer(norm))
    message = f"全文有{len(marks)}个感叹号，至多使用1个"
    return [_violation(text, "exclamation", m.start(), m.end(), message) for m in marks[1:]]


def _check_cta(text: str, norm: str, rules: _Rules, spec: ContentType, brand: Brand) -> list[Violation]:
    if not spec.cta_required or rules.cta.search(norm):
        return []
    return [_violation(text, CTA_KIND, len(text), len(text), f"{spec.name_zh}需要明确的行动号召（如“{brand.cta_phrases[0]}”）")]


def _check_length(text: str, spec: ContentType) -> list[Violation]:
    count = copy_length(text)
    low, high = spec.length
    if low <= count <= high:
        return []
    return [_violation(text, LENGTH_KIND, 0, len(text), f"全文{count}字（不计空白），{spec.name_zh}要求{low}–{high}字")]


def _check_markup(text: str, norm: str, spec: ContentType) -> list[Violation]:
    found = [_violation(text, MARKUP_KIND, m.start(), m.end(), f"残留的格式或标签：{label}")
             for pattern, label in _MARKUP for m in pattern.finditer(norm)]
    return found + [_violation(text, MARKUP_KIND, m.start(), m.end(), "残留的格式或标签：结构标签")
                    for m in _label_markup(spec.labels).finditer(norm)]


# --- fact check ---------------------------------------------------------------------------


def _mask_names(norm: str, rules: _Rules) -> str:
    """The text with the brand's and every product's name blanked out (same length), so that
    棉 in the brand name 棉芽 or 5% in 烟酰胺5%精华 is not read as a fact."""
    return rules.names.sub(lambda m: _MASK * len(m.group()), norm)


def _clause_bounds(norm: str, start: int, end: int) -> tuple[int, int]:
    """Start of the clause containing ``start`` and end of the clause containing ``end``."""
    left = max(norm.rfind(c, 0, start) for c in _CLAUSE_END) + 1
    rights = [i for i in (norm.find(c, end) for c in _CLAUSE_END) if i != -1]
    return left, min(rights, default=len(norm))


def _negated(norm: str, start: int, end: int, vocabulary: re.Pattern) -> bool:
    """True when the mention reads as absent: 不含酒精、香精 / 无香精 / 酒精与香精均未添加."""
    left, right = _clause_bounds(norm, start, end)
    prefix = norm[left:start]
    cues = list(_NEGATION.finditer(prefix))
    if cues:
        gap = _FILLER.sub("", vocabulary.sub("", prefix[cues[-1].end():]))
        if len(gap) <= 2:
            return True
    suffix = vocabulary.sub("", norm[end:right])
    return bool(_NEGATION_AFTER.match(suffix))


def _endogenous(norm: str, start: int, end: int, rules: _Rules) -> bool:
    """True when the world's own substance is meant (brand patterns): 角质层中的神经酰胺 / 胶原蛋白会随年龄流失."""
    left, _ = _clause_bounds(norm, start, end)
    if rules.endogenous_before:
        cues = list(rules.endogenous_before.finditer(norm[left:start]))
        if cues and len(_FILLER.sub("", norm[left:start][cues[-1].end():])) <= 2:
            return True
    return bool(rules.endogenous_after and rules.endogenous_after.match(norm[end:end + 12]))


def _part_of_longer_name(norm: str, start: int, end: int, rules: _Rules) -> bool:
    """True when the mention is only part of a longer name (brand patterns): 脂肪酸甘油酯 / 乳酸钠."""
    if rules.compound_before and rules.compound_before.search(norm[max(0, start - 4):start]):
        return True
    return bool(rules.compound_after and rules.compound_after.match(norm[end - 1:end + 2]))


def _stated_share(norm: str, start: int, end: int, rules: _Rules) -> float | None:
    """The percentage bound to a material mention, as a float, or None.

    A percentage right before the mention binds to it (5%烟酰胺); one right after binds to it
    (烟酰胺5%) unless it directly precedes the next material (95%棉5%氨纶: 5% is 氨纶's).
    """
    after = _PERCENT_AFTER.match(norm[end:end + 40])
    if after:
        rest = norm[end + after.end():]
        if not rules.materials.match(rest, _SHARE_GAP.match(rest).end()):
            return float(after.group(1))
    before = _PERCENT_BEFORE.search(norm[max(0, start - 20):start])
    return float(before.group(1)) if before else None


def _product_has(brand: Brand, product: Product, name: str) -> bool:
    entry = brand.composition.materials[name]
    return any(product.material(member) for member in (entry.covers or (name,)))


def _inside_longer(match: re.Match, pattern: re.Pattern | None, norm: str) -> bool:
    """True when ``match`` lies inside a longer match of another vocabulary (茉莉花 in the aroma 茉莉花香)."""
    if pattern is None:
        return False
    for other in pattern.finditer(norm, max(0, match.start() - 8), min(len(norm), match.end() + 8)):
        if other.start() <= match.start() and match.end() <= other.end() and other.end() - other.start() > match.end() - match.start():
            return True
    return False


def _check_materials(text: str, norm: str, rules: _Rules, brand: Brand, product: Product) -> list[Violation]:
    violations = []
    word = brand.composition.material_word
    for m in rules.materials.finditer(norm):
        name = rules.alias_to_material[m.group()]
        if _part_of_longer_name(norm, m.start(), m.end(), rules) or _inside_longer(m, rules.values, norm):
            continue
        if not _product_has(brand, product, name):
            endogenous = brand.composition.materials[name].endogenous and _endogenous(norm, m.start(), m.end(), rules)
            if not endogenous and not _negated(norm, m.start(), m.end(), rules.materials):
                violations.append(_violation(text, "unknown_material", m.start(), m.end(), f"「{product.name}」不含{word}「{name}」"))
            continue
        violations += _check_share(text, norm, m, product.material(name), brand.composition, rules)
    return violations


def _check_share(text: str, norm: str, match: re.Match, material: Material | None, spec: CompositionSpec,
                 rules: _Rules) -> list[Violation]:
    """Compares a stated share with the catalog; family names (胜肽) carry none."""
    stated = _stated_share(norm, match.start(), match.end(), rules)
    if material is None or stated is None:
        return []
    where = (match.start(), match.end())
    if stated > 100:
        return [_violation(text, "wrong_share", *where, f"{material.name}的{spec.share_word}不可能是{stated:g}%")]
    if material.share is None:
        return [_violation(text, "wrong_share", *where, f"{material.name}的{spec.share_word}未公开，不应写出{stated:g}%")]
    if abs(stated - material.share) < 1e-9:
        return []
    return [_violation(text, "wrong_share", *where, f"{material.name}的{spec.share_word}是{material.share:g}%，文中写作{stated:g}%")]


def _claim_exempt(norm: str, start: int, end: int, rules: _Rules) -> bool:
    """True when a claim phrase is negated, advice, another product or left to one: 并非美白产品 / 白天做好防晒 /
    保湿霜 / 控油这类需求交给其他产品."""
    if rules.claim_noun_after.match(norm[end:end + 2]):
        return True
    left, right = _clause_bounds(norm, start, end)
    if _CLAIM_DEFERRED_AFTER.match(_CLAIM_FILLER.sub("", rules.claims.sub("", norm[end:right]))):
        return True
    prefix = norm[left:start]
    cues = list(_CLAIM_EXEMPT.finditer(prefix))
    if not cues:
        return False
    gap = prefix[cues[-1].end():]
    if _CLAIM_CONTRAST.search(gap):
        return False
    return len(_CLAIM_FILLER.sub("", rules.claims.sub("", gap))) <= 4


def _check_claims(text: str, norm: str, rules: _Rules, brand: Brand, product: Product) -> list[Violation]:
    violations = []
    for m in rules.claims.finditer(norm):
        claim = rules.phrase_to_claim[m.group()]
        if claim not in product.claims and not _claim_exempt(norm, m.start(), m.end(), rules):
            violations.append(_violation(text, "unsupported_claim", m.start(), m.end(),
                                         f"「{product.name}」不可宣称{claim}（不在它的{brand.wording.claim_word}之列）"))
    return violations


def _stated_number(match: re.Match) -> tuple[float, float, bool]:
    """(low, high, at-least) of a number match: ``1200`` -> (1200, 1200, False), ``85-90`` -> (85, 90, False), ``50+``."""
    low = float(match.group(1))
    high = float(match.group(3)) if match.group(3) else low
    return low, high, bool(match.group(2))


def _number_matches(catalog: float | str | tuple[float, float], stated: tuple[float, float, bool]) -> bool:
    low, high, plus = stated
    if isinstance(catalog, tuple):
        return catalog[0] <= low <= high <= catalog[1] and not plus
    value = float(catalog.rstrip("+")) if isinstance(catalog, str) else float(catalog)
    return low == high == value and plus == (isinstance(catalog, str) and catalog.endswith("+"))


def _written(stated: tuple[float, float, bool], spec: FactSpec) -> str:
    low, high, plus = stated
    return (f"{low:g}–{high:g}" if high != low else f"{low:g}{'+' if plus else ''}") + spec.unit


def _check_numbers(text: str, norm: str, rules: _Rules, product: Product) -> list[Violation]:
    violations = []
    for spec, phrases, after, before in rules.numbers:
        for m in phrases.finditer(norm):
            found = after.match(norm, m.end(), min(len(norm), m.end() + 20))
            if found is None and before is not None:
                found = before.search(norm[max(0, m.start() - 20):m.start()])
            if found is None:
                continue
            stated = _stated_number(found)
            if spec.id not in product.facts:
                if not _claim_exempt(norm, m.start(), m.end(), rules):
                    violations.append(_violation(text, "wrong_fact", m.start(), m.end(),
                                                 f"「{product.name}」没有{spec.label}这一项，不应写出{_written(stated, spec)}"))
            elif not _number_matches(product.facts[spec.id], stated):
                violations.append(_violation(text, "wrong_fact", m.start(), m.end(),
                                             f"{spec.label}是{spec.display(product.facts[spec.id])}，文中写作{_written(stated, spec)}"))
    return violations


def _contrasted(norm: str, start: int, end: int, rules: _Rules) -> bool:
    """True when an enum or set value is negated or set against the product's own: 不同于重焙火 / 比起玻璃杯."""
    left, right = _clause_bounds(norm, start, end)
    prefix = norm[left:start]
    cues = list(_CONTRAST.finditer(prefix))
    if cues:
        gap = prefix[cues[-1].end():]
        if not _AFFIRM.search(gap) and len(_FILLER.sub("", rules.values.sub("", gap))) <= 4:
            return True
    return bool(_CONTRAST_AFTER.match(rules.values.sub("", norm[end:right])))


def _check_values(text: str, norm: str, rules: _Rules, brand: Brand, product: Product) -> list[Violation]:
    if rules.values is None:
        return []
    violations = []
    for m in rules.values.finditer(norm):
        if _inside_longer(m, rules.materials, norm):  # 福鼎 inside the material 福鼎大白茶
            continue
        fact_id, value = rules.phrase_to_value[m.group()]
        spec, own = brand.facts[fact_id], product.facts.get(fact_id)
        if own is not None and (value == own if spec.type == "enum" else value in own):
            continue
        if _contrasted(norm, m.start(), m.end(), rules):
            continue
        message = (f"「{product.name}」没有{spec.label}这一项，不应写出「{value}」" if own is None
                   else f"{spec.label}是{spec.display(own)}，文中写作「{value}」")
        violations.append(_violation(text, "wrong_fact", m.start(), m.end(), message))
    return violations


def check_facts(brand, text: str, norm: str, product) -> list[Violation]:
    """Every fact-check violation of one text about ``product`` (names masked first)."""
    rules = _rules(brand)
    masked = _mask_names(norm, rules)
    return (_check_materials(text, masked, rules, brand, product) + _check_claims(text, masked, rules, brand, product)
            + _check_numbers(text, masked, rules, product) + _check_values(text, masked, rules, brand, product))


def name_spans(brand, text: str) -> list[tuple[int, int]]:
    """Spans of the brand's and every product's name in ``text`` (what no edit may touch)."""
    return [(m.start(), m.end()) for m in _rules(brand).names.finditer(normalize(text))]


# --- entry points -------------------------------------------------------------------------


def lint_text(brand, text: str, content_type: str, product_id: str | None = None) -> LintResult:
    """Lints one text against the brand guide, the content type and (with product_id) the catalog.

    Args:
        brand: a loaded Brand.
        text: the copy.
        content_type: a content type id.
        product_id: a product id; when given, the fact check runs against that product.

    Returns:
        LintResult with violations sorted by span and the score.

    Raises:
        KeyError: unknown content_type or product_id.
    """
    spec = brand.content_type(content_type)
    rules = _rules(brand)
    norm = normalize(text)
    violations = (_check_banned(text, norm, rules) + _check_absolute(text, norm, rules) + _check_exclamation(text, norm)
                  + _check_cta(text, norm, rules, spec, brand) + _check_length(text, spec) + _check_markup(text, norm, spec))
    if product_id is not None:
        violations += check_facts(brand, text, norm, brand.product(product_id))
    violations.sort(key=lambda v: (v.span, v.kind))
    return LintResult(tuple(violations), score(violations))


def lint_records(brand, records: list[dict]) -> list[LintResult]:
    """Lints records with ``text``, ``content_type`` and optional ``product_id``; one LintResult each."""
    return [lint_text(brand, r["text"], r["content_type"], r.get("product_id")) for r in records]


def lint_file(path: str | Path, brand) -> list[tuple[int, dict, LintResult]]:
    """Validates every line of a JSONL file, then lints each record.

    Args:
        path: JSONL with ``text``, ``content_type``, optional ``id`` and ``product_id``.
        brand: a loaded Brand.

    Returns:
        list of (line number, record, LintResult).

    Raises:
        BrandDataError: a malformed line, missing field, unknown content_type or product_id, or
            empty text, before anything is linted.
    """
    numbered = read_records(path, brand)
    results = lint_records(brand, [record for _, record in numbered])
    return [(number, record, result) for (number, record), result in zip(numbered, results)]


def result_json(record_id: str | None, result: LintResult) -> str:
    """The ``--json`` line of one record."""
    return json.dumps({"id": record_id, "violations": [v.to_dict() for v in result.violations], "score": round(result.score, 4)},
                      ensure_ascii=False)


def _marked(text: str, span: tuple[int, int], width: int = 18) -> str:
    start, end = span
    left = text[max(0, start - width):start]
    right = text[end:end + width]
    middle = text[start:end] if end - start <= 2 * width else f"{text[start:start + width]}……{text[end - width:end]}"
    return f"…{left}⟦{middle}⟧{right}…".replace("\n", " ")


def format_report(linted: list[tuple[int, dict, LintResult]]) -> str:
    """A readable report of ``lint_file`` output, offending spans marked with ⟦ ⟧."""
    lines = []
    for number, record, result in linted:
        if result.clean:
            continue
        lines.append(f"line {number} id={record.get('id', '-')} {record['content_type']} score={result.score:.2f}")
        for v in result.violations:
            lines.append(f"  [{v.kind}] {v.span[0]}-{v.span[1]} {v.message}")
            lines.append(f"      {_marked(record['text'], v.span)}")
    dirty = sum(1 for _, _, r in linted if not r.clean)
    lines.append(f"{len(linted)} records, {dirty} with violations")
    return "\n".join(lines)
