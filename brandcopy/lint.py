"""Rule checks and the fact check against the catalog: the one grader rewards and evaluation share.

``lint_text`` returns every violation with its kind, character span, offending text and a
Chinese message (the messages also serve as repair hints in data generation). Kinds:

- ``forbidden_word``: a banned word of brand.yaml, also in upper case, full-width or spaced out.
- ``absolute_claim``: a pattern of brand.yaml's ``absolute_claims`` (advertising law, medical terms).
- ``exclamation``: every exclamation mark after the first (half- or full-width).
- ``missing_cta``: a content type with ``cta_required`` and no match of ``cta_patterns``.
- ``length``: characters (whitespace excluded) outside the content type's range.
- ``markup``: Markdown, HTML or special tokens, 【labels】, "标题："-style labels, preambles.
- ``unknown_ingredient``: an ingredient of the lexicon the product does not contain (not when
  negated: 不含酒精, 无香精, 酒精、香精均未添加; nor inside a longer chemical name: 脂肪酸甘油酯).
- ``wrong_concentration``: a concentration next to a product ingredient that differs from the
  catalog, or any concentration for one the catalog does not disclose.
- ``unsupported_claim``: a claim-lexicon phrase whose canonical claim the product may not make
  (not when negated, given as advice or left to other products: 并非美白产品, 白天做好防晒,
  控油这类需求交给其他步骤), or SPF on a non-sunscreen.
- ``wrong_spf``: an SPF or PA rating that differs from the catalog.

Score (defined once, here): ``score = 1 / (1 + number of violations)``; 1.0 is clean, one
violation gives 0.5, three give 0.25. Checks run on a per-character NFKC-normalised, lower-cased
copy of the text, so spans index the original text and brand patterns see ``!`` for ``！``,
``,`` for ``，``, ``%`` for ``％``, ``(`` for ``（``. Rules are compiled once per Brand object.
"""

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from brandcopy.brand import read_records

RULE_KINDS = ("forbidden_word", "absolute_claim", "exclamation", "missing_cta", "length", "markup")
FACT_KINDS = frozenset({"unknown_ingredient", "wrong_concentration", "unsupported_claim", "wrong_spf"})  # need a product_id

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
    (r"(?m)^[ \t]*(?:标题|副标题|正文|文案|内容|标签|话题|配图|封面|行动号召|问题|放大|解决|属性|优势|利益|之前|之后|桥梁"
     r"|title|subtitle|body|headline|hook|caption|cta|copy)[ \t]*:", "结构标签"),
    (r"(?m)^[ \t]*(?:好的|当然|以下是|下面是|这是|这里是|为您|为你)[^\n。]{0,30}(?:文案|内容|版本|笔记|广告)", "生成说明"),
    (r"\(\s*(?:约|共|全文)?\s*\d+\s*字\s*\)|字数\s*:?\s*\d+", "字数标注"),
    (r"\{\{|\}\}|\{[a-z_]+\}|\[(?:产品名|品牌名|链接|价格|成分)\]|(?<![a-z])x{3,}(?![a-z])", "模板占位符"),
])
_PERCENT_AFTER = re.compile(
    r"^\s*(?:\([^()%\n]{0,20}\)\s*|\)\s*)?\(?\s*的?(?:浓度|含量|添加量)?\s*(?:为|达|是|高达|约为?|达到)?\s*(\d+(?:\.\d+)?)\s*%")
_PERCENT_BEFORE = re.compile(r"(\d+(?:\.\d+)?)\s*%\s*(?:浓度)?\s*的?\s*$")
_ING_NEGATION = re.compile(
    r"不含|不添加|未添加|没有添加|无添加|零添加|不加|未加|没加|不使用|未使用|没有使用|剔除|去除了|摒弃|拒绝|不是|并非|而非|区别于|不同于"
    r"|没有|无|免|零|(?<![\d.])0(?![\d.%])"
    # advice to keep another ingredient apart is not a claim that the product contains it
    r"|避免与|避免和|不要与|不要和|不建议与|不建议和|别与|别和|勿与|不宜与|不能与|不能和|不可与|错开")
_ING_NEGATION_AFTER = re.compile(
    r"^[\s、,和与及或/]*(?:均|都|也|皆|一律)?(?:未|不|没有|零|无)(?:添加|含|使用)|^等?类?(?:产品)?(?:错开|分开|分早晚|间隔)")
_PHYSIOLOGY_BEFORE = re.compile(
    r"(?:皮肤|肌肤|角质层|细胞间|真皮层?|表皮层?|屏障|体内|人体)(?:自身|本身|自带|原有)?(?:中|里|内|间)?|自身|天然存在|促进|合成")
_PHYSIOLOGY_AFTER = re.compile(
    r"^(?:等[^\s,。]{0,4}?)?(?:会|也|逐渐|随之|持续|随着?年龄(?:增长)?|随)*的?(?:合成|生成|流失|减少|下降|不足|缺乏|含量|分泌|降解|比例|水平"
    r"|骨架|结构)")  # 神经酰胺NP中的P指植物鞘氨醇骨架: a building block of a molecule, not an added ingredient
# a name running on into a longer chemical name is another substance: 脂肪酸甘油酯, 乙基己基甘油, 聚甘油, 乳酸钠
_COMPOUND_AFTER = re.compile(r"^[一二三四单双聚]?(?:酯|醚|酰)")
_COMPOUND_BEFORE = re.compile(r"(?:聚|基|酰)$")
_ACID_SALT_AFTER = re.compile(r"^(?:钠|钾|钙|镁|锌|铵|盐)")
_ING_FILLER = re.compile(r"[\s、,和与及或/]|以及|或者|任何|额外|添加|含有|使用|的")
_CLAIM_EXEMPT = re.compile(
    r"不能|无法|不会|并不|并非|不是|不主打|不宣称|没有|不具备|不可|不做|不承诺|不等于|不代表|避免|不要|别|过度|频繁|过量|无需|不必|不用"
    r"|不负责|不针对|不承担|不含|不添加|做好|注意|加强|及时|搭配|配合|记得|叠加|后续|再做|另外|需要|需|建议|同时|加上|辅以")
# a claim phrase naming another product or step ("涂一层保湿霜", "防晒霜") is not a claim
_CLAIM_NOUN_AFTER = re.compile(r"^(?:霜|乳|步骤|工作|环节|措施)")
# a need handed to another product or step: 控油、去角质这些需求交给其他步骤
_CLAIM_DEFERRED_AFTER = re.compile(
    r"^(?:等|这些|这类|这种|这样的|之类的?)*(?:需求|需要|功能|功效|诉求|任务|工作|问题)?(?:就|可以|可|请|不妨|则)?(?:交给|留给|交由|让给)"
    r"(?:其他|其它|别的|另外的?|专门的?|其余的?)")
_CLAIM_CONTRAST = re.compile(r"而是|但|却|而|还能|也能")
_CLAIM_FILLER = re.compile(r"[\s、,和与及或/的]")
_SPF = re.compile(r"(?<![a-z])spf\s*(\d+)\s*(\+?)")
_PA = re.compile(r"(?<![a-z])pa\s*(\++)")
_EXCLAMATION = re.compile(r"!")


@dataclass(frozen=True)
class Violation:
    """One rule violation; ``span`` is ``(start, end)`` into the original text."""

    kind: str
    span: tuple[int, int]
    text: str
    message: str

    def to_dict(self):
        return {"kind": self.kind, "span": list(self.span), "text": self.text, "message": self.message}


@dataclass(frozen=True)
class LintResult:
    """All violations of one text and its score in [0, 1] (1.0 when clean)."""

    violations: tuple[Violation, ...]
    score: float

    @property
    def clean(self):
        return not self.violations

    def kinds(self):
        """The set of violation kinds present."""
        return {v.kind for v in self.violations}


def score(violations):
    """The lint score: ``1 / (1 + len(violations))``, in (0, 1], 1.0 when clean."""
    return 1.0 / (1.0 + len(violations))


def normalize(text):
    """NFKC + lower-case per character, keeping one character per character so spans survive."""
    return "".join(_normalize_char(c) for c in text)


@lru_cache(maxsize=4096)
def _normalize_char(char):
    folded = unicodedata.normalize("NFKC", char).lower()
    return folded if len(folded) == 1 else char.lower()


# --- compiled rules -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rules:
    banned: tuple[tuple[str, re.Pattern], ...]
    absolute: tuple[tuple[re.Pattern, str], ...]
    cta: re.Pattern
    ingredients: re.Pattern
    alias_to_ingredient: dict
    claims: re.Pattern
    phrase_to_claim: dict


def _term_pattern(term, spaced=False):
    """Regex for a normalised term; ASCII edges get word boundaries, ``spaced`` allows 'Y Y D S'."""
    chars = [re.escape(c) for c in normalize(term)]
    body = r"[\s·・.\-_*]*".join(chars) if spaced else "".join(chars)
    head = r"(?<![a-z0-9])" if term[0].isascii() and term[0].isalnum() else ""
    tail = r"(?![a-z0-9])" if term[-1].isascii() and term[-1].isalnum() else ""
    return head + body + tail


def _alternation(terms):
    """One regex matching any term, longest first so that 水杨酸乙基己酯 wins over 水杨酸."""
    ordered = sorted(set(terms), key=lambda t: (-len(t), t))
    return re.compile("|".join(_term_pattern(t) for t in ordered))


@lru_cache(maxsize=16)
def _rules(brand):
    """Compiles the brand's rules once; Brand hashes by identity."""
    alias_to_ingredient = {}
    for entry in brand.ingredient_lexicon.values():
        for alias in (entry.name, *entry.aliases):
            alias_to_ingredient[normalize(alias)] = entry.name
    phrase_to_claim = {normalize(p): claim for claim, phrases in brand.claim_lexicon.items() for p in phrases}
    return _Rules(
        banned=tuple((w, re.compile(_term_pattern(w, spaced=True))) for w in brand.banned_words),
        absolute=tuple((re.compile(p), reason) for p, reason in brand.absolute_claims),
        cta=re.compile("|".join(f"(?:{p})" for p in brand.cta_patterns)),
        ingredients=_alternation(alias_to_ingredient),
        alias_to_ingredient=alias_to_ingredient,
        claims=_alternation(phrase_to_claim),
        phrase_to_claim=phrase_to_claim,
    )


# --- rule checks --------------------------------------------------------------------------


def _violation(text, kind, start, end, message):
    return Violation(kind, (start, end), text[start:end], message)


def _check_banned(text, norm, rules):
    return [_violation(text, "forbidden_word", m.start(), m.end(), f"品牌禁用词「{word}」")
            for word, pattern in rules.banned for m in pattern.finditer(norm)]


def _check_absolute(text, norm, rules):
    return [_violation(text, "absolute_claim", m.start(), m.end(), reason)
            for pattern, reason in rules.absolute for m in pattern.finditer(norm)]


def _check_exclamation(text, norm):
    marks = list(_EXCLAMATION.finditer(norm))
    message = f"全文有{len(marks)}个感叹号，至多使用1个"
    return [_violation(text, "exclamation", m.start(), m.end(), message) for m in marks[1:]]


def _check_cta(text, norm, rules, spec):
    if not spec.cta_required or rules.cta.search(norm):
        return []
    return [_violation(text, "missing_cta", len(text), len(text), f"{spec.name_zh}需要明确的行动号召（如“点击下方链接了解配方详情”）")]


def _check_length(text, spec):
    count = sum(1 for c in text if not c.isspace())
    low, high = spec.length
    if low <= count <= high:
        return []
    return [_violation(text, "length", 0, len(text), f"全文{count}字（不计空白），{spec.name_zh}要求{low}–{high}字")]


def _check_markup(text, norm):
    return [_violation(text, "markup", m.start(), m.end(), f"残留的格式或标签：{label}")
            for pattern, label in _MARKUP for m in pattern.finditer(norm)]



# --- fact check ---------------------------------------------------------------------------


def _clause_bounds(norm, start, end):
    """Start of the clause containing ``start`` and end of the clause containing ``end``."""
    left = max(norm.rfind(c, 0, start) for c in _CLAUSE_END) + 1
    rights = [i for i in (norm.find(c, end) for c in _CLAUSE_END) if i != -1]
    return left, min(rights, default=len(norm))


def _ingredient_negated(norm, start, end, rules):
    """True when the mention reads as absent: 不含酒精、香精 / 无香精 / 酒精与香精均未添加."""
    left, right = _clause_bounds(norm, start, end)
    prefix = norm[left:start]
    cues = list(_ING_NEGATION.finditer(prefix))
    if cues:
        gap = _ING_FILLER.sub("", rules.ingredients.sub("", prefix[cues[-1].end():]))
        if len(gap) <= 2:
            return True
    suffix = rules.ingredients.sub("", norm[end:right])
    return bool(_ING_NEGATION_AFTER.match(suffix))


def _physiological(norm, start, end):
    """True when the skin's own substance is meant: 角质层中的神经酰胺 / 胶原蛋白会随年龄流失."""
    left, _ = _clause_bounds(norm, start, end)
    cues = list(_PHYSIOLOGY_BEFORE.finditer(norm[left:start]))
    if cues and len(_ING_FILLER.sub("", norm[left:start][cues[-1].end():])) <= 2:
        return True
    return bool(_PHYSIOLOGY_AFTER.match(norm[end:end + 12]))


def _part_of_compound(norm, start, end):
    """True when the mention is only part of a longer chemical name: 脂肪酸甘油酯 / 乙基己基甘油 / 乳酸钠."""
    after = norm[end:end + 2]
    if _COMPOUND_AFTER.match(after) or _COMPOUND_BEFORE.search(norm[max(0, start - 1):start]):
        return True
    return norm[end - 1] == "酸" and bool(_ACID_SALT_AFTER.match(after))


def _stated_percent(norm, start, end):
    """The concentration written right after or right before a mention, as a float, or None."""
    after = _PERCENT_AFTER.match(norm[end:end + 40])
    if after:
        return float(after.group(1))
    before = _PERCENT_BEFORE.search(norm[max(0, start - 20):start])
    return float(before.group(1)) if before else None


def _product_has(brand, product, name):
    entry = brand.ingredient_lexicon[name]
    members = entry.covers or (name,)
    return any(product.ingredient(member) for member in members)


def _check_ingredients(text, norm, rules, brand, product):
    violations = []
    for m in rules.ingredients.finditer(norm):
        name = rules.alias_to_ingredient[m.group()]
        if _part_of_compound(norm, m.start(), m.end()):
            continue
        if not _product_has(brand, product, name):
            endogenous = brand.ingredient_lexicon[name].endogenous and _physiological(norm, m.start(), m.end())
            if not endogenous and not _ingredient_negated(norm, m.start(), m.end(), rules):
                violations.append(_violation(text, "unknown_ingredient", m.start(), m.end(), f"「{product.name}」不含{name}"))
            continue
        violations += _check_concentration(text, norm, m, product.ingredient(name))
    return violations


def _check_concentration(text, norm, match, ingredient):
    """Compares a stated concentration with the catalog; family names (胜肽) carry none."""
    stated = _stated_percent(norm, match.start(), match.end())
    if ingredient is None or stated is None:
        return []
    if ingredient.concentration is None:
        return [_violation(text, "wrong_concentration", match.start(), match.end(), f"{ingredient.name}的浓度未公开，不应写出{stated:g}%")]
    if abs(stated - float(ingredient.concentration.rstrip("%"))) < 1e-9:
        return []
    return [_violation(text, "wrong_concentration", match.start(), match.end(), f"{ingredient.name}的浓度是{ingredient.concentration}，文中写作{stated:g}%")]


def _claim_exempt(norm, start, end, rules):
    """True when a claim phrase is negated, advice, another product or left to one: 并非美白产品 / 白天做好防晒 /
    保湿霜 / 控油这类需求交给其他产品."""
    if _CLAIM_NOUN_AFTER.match(norm[end:end + 2]):
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


def _check_claims(text, norm, rules, product):
    violations = []
    for m in rules.claims.finditer(norm):
        claim = rules.phrase_to_claim[m.group()]
        if claim not in product.claims and not _claim_exempt(norm, m.start(), m.end(), rules):
            violations.append(_violation(text, "unsupported_claim", m.start(), m.end(), f"「{product.name}」不可宣称{claim}"))
    return violations


def _check_spf(text, norm, rules, product):
    violations = []
    for m in _SPF.finditer(norm):
        if product.spf is None:
            if not _claim_exempt(norm, m.start(), m.end(), rules) and "防晒" not in norm[m.end():m.end() + 10]:
                violations.append(_violation(text, "unsupported_claim", m.start(), m.end(), f"「{product.name}」不是防晒产品，不可标示SPF"))
        elif m.group(1) + m.group(2) != product.spf:
            violations.append(_violation(text, "wrong_spf", m.start(), m.end(), f"防晒指数是SPF{product.spf}，文中写作SPF{m.group(1)}{m.group(2)}"))
    for m in _PA.finditer(norm):
        if product.pa is not None and m.group(1) != product.pa:
            violations.append(_violation(text, "wrong_spf", m.start(), m.end(), f"PA等级是PA{product.pa}，文中写作PA{m.group(1)}"))
    return violations


# --- entry points -------------------------------------------------------------------------


def lint_text(brand, text, content_type, product_id=None):
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
                  + _check_cta(text, norm, rules, spec) + _check_length(text, spec) + _check_markup(text, norm))
    if product_id is not None:
        product = brand.product(product_id)
        violations += (_check_ingredients(text, norm, rules, brand, product) + _check_claims(text, norm, rules, product)
                       + _check_spf(text, norm, rules, product))
    violations.sort(key=lambda v: (v.span, v.kind))
    return LintResult(tuple(violations), score(violations))


def lint_records(brand, records):
    """Lints records with ``text``, ``content_type`` and optional ``product_id``; one LintResult each."""
    return [lint_text(brand, r["text"], r["content_type"], r.get("product_id")) for r in records]


def lint_file(path, brand):
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


def result_json(record_id, result):
    """The ``--json`` line of one record."""
    return json.dumps({"id": record_id, "violations": [v.to_dict() for v in result.violations], "score": round(result.score, 4)},
                      ensure_ascii=False)


def _marked(text, span, width=18):
    start, end = span
    left = text[max(0, start - width):start]
    right = text[end:end + width]
    middle = text[start:end] if end - start <= 2 * width else f"{text[start:start + width]}……{text[end - width:end]}"
    return f"…{left}⟦{middle}⟧{right}…".replace("\n", " ")


def format_report(linted):
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
