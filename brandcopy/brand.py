"""Loading a brand: style guide, shared content types, product catalog, golden set, split.

A brand is a folder ``data/brands/<name>/`` with ``brand.yaml`` and ``products.jsonl`` (and,
once written, ``golden.jsonl``); the nine content types are shared by every brand and live in
``data/content_types.yaml``. Every malformed input raises :class:`BrandDataError` naming the
file, the line and the field. See docs/architecture.md for the data contracts.
"""

import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from brandcopy.files import DataFileError, NotUTF8Error, parse_jsonl, read_text

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CONTENT_TYPES_PATH = DATA_DIR / "content_types.yaml"
BRAND_FILES = ("brand.yaml", "products.jsonl")
FAMILIES = ("social", "ecommerce", "paid_ad")
MIN_VAL_FRACTION = 0.15
FACT_TYPES = ("number", "enum", "set", "text")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?\+?$")  # a number fact written as a string: "50+" (at least 50)


class BrandDataError(DataFileError):
    """Bad brand data or bad records: says which file, line and field."""


@dataclass(frozen=True)
class Material:
    """One material of a product's composition part; ``share`` (percent) is None when undisclosed."""

    name: str
    share: float | None
    note: str | None = None


@dataclass(frozen=True)
class Part:
    """One part of a composition (a skincare formula, a tea blend, a shell fabric, a filling)."""

    name: str
    materials: tuple[Material, ...]


@dataclass(frozen=True)
class FactSpec:
    """One typed product fact declared in brand.yaml's ``facts``.

    Attributes:
        id: Key of the fact in products.jsonl's ``facts``.
        label: Chinese label shown in prompts and lint messages (``海拔``, ``管理类别``).
        type: ``number`` (a number, ``"50+"`` or a ``[low, high]`` range, with ``unit``), ``enum``
            (one of ``values``), ``set`` (a list of ``values``) or ``text`` (a string or a list of
            strings, shown, never checked).
        phrases: What names the fact in copy (``海拔``, ``SPF``); a number fact is read after or
            before one of them.
        units: The unit as written in prompts first, then its other spellings (``米``, ``m``).
        range: ``(low, high)`` of plausible values of a number fact.
        values: enum and set vocabulary: value -> phrases that name it (the value itself when none
            are listed).
        required: Whether every product must state it.
        join: Separator between the items of a set or list-valued text fact in prompts.
    """

    id: str
    label: str
    type: str
    phrases: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    range: tuple[float, float] = (0.0, math.inf)
    values: dict = field(default_factory=dict)
    required: bool = False
    join: str = "、"

    @property
    def unit(self) -> str:
        """The unit as prompts write it ('' when the fact has none)."""
        return self.units[0] if self.units else ""

    def display(self, value: float | str | tuple | list) -> str:
        """A product's value of this fact as prompts and lint messages write it: ``1200米``, ``85–90℃``."""
        if self.type == "number":
            if isinstance(value, tuple):
                return f"{value[0]:g}–{value[1]:g}{self.unit}"
            return f"{value if isinstance(value, str) else format(value, 'g')}{self.unit}"
        return value if isinstance(value, str) else self.join.join(value)


@dataclass(frozen=True)
class MaterialEntry:
    """A material the fact check recognises.

    ``covers`` is set for a family name such as 胜肽; ``endogenous`` marks substances that also
    occur on their own in the product's world (the skin's own 神经酰胺), which a text may discuss
    in the contexts brand.yaml's ``composition.endogenous_before/after`` describe.
    """

    name: str
    aliases: tuple[str, ...]
    covers: tuple[str, ...] = ()
    endogenous: bool = False


@dataclass(frozen=True)
class CompositionSpec:
    """brand.yaml's ``composition``: what a product is made of, its wording and its materials."""

    label: str  # prompt label of the composition (核心成分, 原料)
    material_word: str  # what one material is called (成分, 原料)
    share_word: str  # what a share is called (浓度, 占比)
    undisclosed: str  # shown for a material without a share (浓度未公开)
    complete: bool  # shares of a part add up to 100 when all are given (blends, fabrics)
    materials: dict  # canonical name -> MaterialEntry
    endogenous_before: str | None = None  # regexes: the context of an endogenous mention
    endogenous_after: str | None = None
    compound_before: str | None = None  # regexes: a name running on into a longer one is another material
    compound_after: str | None = None


@dataclass(frozen=True)
class Wording:
    """Words the library's prompts, lint messages and judge rubric use for this brand."""

    expert: str  # the teacher's second role in generation prompts (资深化妆品配方师)
    fact_scope: str  # what copy may only take from the product facts (成分、浓度和功效)
    claims_label: str  # prompt label of the claims a product may make (可宣称功效)
    claim_word: str  # what a claim is called in lint messages (功效)


@dataclass(frozen=True)
class Product:
    """One catalog entry (a line of products.jsonl).

    ``facts`` maps fact ids of brand.yaml's ``facts`` to values; ``schema`` is the brand's
    (composition spec, fact specs, wording), so that prompts can render a product on its own.
    """

    id: str
    name: str
    category: str
    composition: tuple[Part, ...]
    claims: tuple[str, ...]
    facts: dict
    size: str
    price: float
    schema: "ProductSchema" = field(compare=False, repr=False, default=None)

    @property
    def materials(self) -> tuple[Material, ...]:
        """Every material of every part, in order."""
        return tuple(m for part in self.composition for m in part.materials)

    def material(self, name: str) -> Material | None:
        """Returns the product's Material called ``name`` (canonical name), or None."""
        return next((m for m in self.materials if m.name == name), None)


@dataclass(frozen=True)
class ProductSchema:
    """What a brand's products are made of and which facts they state."""

    composition: CompositionSpec
    facts: dict  # fact id -> FactSpec, in brand.yaml order
    wording: Wording


@dataclass(frozen=True)
class ContentType:
    """One of the nine content types of data/content_types.yaml."""

    id: str
    family: str
    name_zh: str
    purpose: str
    structure: tuple[str, ...]
    length: tuple[int, int]
    cta_required: bool
    instruction: str
    labels: tuple[str, ...] = ()  # structure labels the copy may use ("之前：", "特性："); not markup


@dataclass(eq=False)  # identity hash: lint caches compiled rules per Brand object
class Brand:
    """A loaded brand folder plus the shared content types."""

    name: str
    name_en: str
    path: Path
    philosophy: str
    persona: str
    tone_rules: list[str]
    encouraged_words: list[str]
    banned_words: list[str]
    absolute_claims: list[tuple[str, str]]  # (pattern, reason)
    exclamation_policy: str
    cta_phrases: list[str]
    cta_patterns: list[str]
    schema: ProductSchema
    claim_lexicon: dict[str, list[str]]
    claim_noun_after: str | None  # regex: a claim phrase running on into a product noun (保湿霜) is no claim
    split_seed: int
    val_fraction: float
    products: dict[str, Product] = field(default_factory=dict)
    content_types: dict[str, ContentType] = field(default_factory=dict)

    @property
    def wording(self) -> Wording:
        return self.schema.wording

    @property
    def composition(self) -> CompositionSpec:
        return self.schema.composition

    @property
    def facts(self) -> dict[str, FactSpec]:
        return self.schema.facts

    def product(self, product_id: str) -> Product:
        """Returns the Product with this id; raises KeyError naming the id when unknown."""
        if product_id not in self.products:
            raise KeyError(f"unknown product_id {product_id!r} for brand {self.name}")
        return self.products[product_id]

    def content_type(self, content_type: str) -> ContentType:
        """Returns the ContentType with this id; raises KeyError naming the id when unknown."""
        if content_type not in self.content_types:
            raise KeyError(f"unknown content_type {content_type!r}; known: {', '.join(self.content_types)}")
        return self.content_types[content_type]

    def split(self) -> dict[str, list[str]]:
        """Deterministic product-level split: ``{"train": [ids], "val": [ids]}``, both sorted.

        Product ids are sorted, shuffled with ``split_seed``, and the first
        ``ceil(val_fraction * n)`` go to val, so no product is on both sides.
        """
        ids = sorted(self.products)
        random.Random(self.split_seed).shuffle(ids)
        n_val = math.ceil(self.val_fraction * len(ids))
        return {"train": sorted(ids[n_val:]), "val": sorted(ids[:n_val])}


# --- YAML with line numbers ---------------------------------------------------------------


class _LineDict(dict):
    """A mapping that remembers its own line and each key's line (1-based)."""

    line = 0
    key_lines: dict = {}


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node):
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path):
    """Parses a YAML file whose top level must be a mapping; errors carry the line."""
    try:
        data = yaml.load(_text(path), Loader=_LineLoader)
    except yaml.YAMLError as err:
        line = err.problem_mark.line + 1 if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark else None
        raise BrandDataError(path, line, None, f"malformed YAML: {err}") from err
    if not isinstance(data, _LineDict):
        raise BrandDataError(path, 1, None, "expected a mapping at the top level")
    return data


def _get(mapping, key, kind, path, prefix=""):
    """Returns ``mapping[key]`` checked against ``kind``; raises BrandDataError with its line."""
    name = prefix + key
    if key not in mapping or mapping[key] is None:
        raise BrandDataError(path, mapping.line, name, "missing field")
    value = mapping[key]
    if not isinstance(value, kind):
        raise BrandDataError(path, mapping.key_lines[key], name, f"expected {_kind_name(kind)}")
    if kind is str and not value.strip():
        raise BrandDataError(path, mapping.key_lines[key], name, "empty text")
    return value


def _kind_name(kind):
    names = {str: "a string", list: "a list", dict: "a mapping", bool: "true or false", int: "an integer"}
    return names.get(kind, "a number")


def _str_list(mapping, key, path, prefix=""):
    values = _get(mapping, key, list, path, prefix)
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise BrandDataError(path, mapping.key_lines[key], prefix + key, "expected a list of non-empty strings")
    return values


def _compile(pattern, path, line, name):
    try:
        re.compile(pattern)
    except re.error as err:
        raise BrandDataError(path, line, name, f"invalid regular expression: {err}") from err
    return pattern


# --- content types ------------------------------------------------------------------------


def load_content_types(path: str | Path = CONTENT_TYPES_PATH) -> dict[str, ContentType]:
    """Loads and validates the shared content types.

    Args:
        path: the content_types.yaml file.

    Returns:
        dict of content type id -> ContentType, in file order.

    Raises:
        BrandDataError: malformed YAML, a missing or mistyped field, a bad family or length.
    """
    data = _read_yaml(path)
    return {type_id: _content_type(type_id, spec, data, path) for type_id, spec in data.items()}


def _content_type(type_id, spec, data, path):
    if not isinstance(spec, _LineDict):
        raise BrandDataError(path, data.key_lines[type_id], type_id, "expected a mapping")
    family = _get(spec, "family", str, path, f"{type_id}.")
    if family not in FAMILIES:
        raise BrandDataError(path, spec.key_lines["family"], f"{type_id}.family", f"must be one of {FAMILIES}")
    length = _get(spec, "length", list, path, f"{type_id}.")
    if len(length) != 2 or not all(isinstance(n, int) for n in length) or not 0 < length[0] < length[1]:
        raise BrandDataError(path, spec.key_lines["length"], f"{type_id}.length", "expected [min, max] with 0 < min < max")
    return ContentType(
        id=type_id,
        family=family,
        name_zh=_get(spec, "name_zh", str, path, f"{type_id}."),
        purpose=_get(spec, "purpose", str, path, f"{type_id}."),
        structure=tuple(_str_list(spec, "structure", path, f"{type_id}.")),
        length=(length[0], length[1]),
        cta_required=_get(spec, "cta_required", bool, path, f"{type_id}."),
        instruction=_get(spec, "instruction", str, path, f"{type_id}.").strip(),
        labels=tuple(_str_list(spec, "labels", path, f"{type_id}.")) if "labels" in spec else (),
    )


def _content_type_overrides(data, path, content_types):
    """Applies brand.yaml's ``content_types``: per type, ``instruction`` replaces, ``instruction_extra`` appends."""
    if "content_types" not in data:
        return content_types
    raw = _get(data, "content_types", dict, path)
    result = dict(content_types)
    for type_id, spec in raw.items():
        name = f"content_types.{type_id}"
        if type_id not in content_types:
            raise BrandDataError(path, raw.key_lines[type_id], name, f"unknown content type; known: {', '.join(content_types)}")
        if not isinstance(spec, _LineDict) or not set(spec) or set(spec) - {"instruction", "instruction_extra"}:
            raise BrandDataError(path, raw.key_lines[type_id], name, "expected a mapping with instruction and/or instruction_extra")
        instruction = _get(spec, "instruction", str, path, name + ".").strip() if "instruction" in spec else content_types[type_id].instruction
        if "instruction_extra" in spec:
            instruction += _get(spec, "instruction_extra", str, path, name + ".").strip()
        result[type_id] = replace(content_types[type_id], instruction=instruction)
    return result


# --- brand.yaml ---------------------------------------------------------------------------


def _brand_fields(path):
    """Reads brand.yaml into the keyword arguments of Brand (without products and types)."""
    data = _read_yaml(path)
    split = _get(data, "split", dict, path)
    val_fraction = _get(split, "val_fraction", (int, float), path, "split.")
    if not MIN_VAL_FRACTION <= val_fraction < 1:
        raise BrandDataError(path, split.key_lines["val_fraction"], "split.val_fraction", f"must be in [{MIN_VAL_FRACTION}, 1)")
    fields = dict(
        name=_get(data, "name", str, path),
        name_en=_get(data, "name_en", str, path),
        philosophy=_get(data, "philosophy", str, path),
        persona=_get(data, "persona", str, path).strip(),
        tone_rules=_str_list(data, "tone_rules", path),
        encouraged_words=_str_list(data, "encouraged_words", path),
        banned_words=_str_list(data, "banned_words", path),
        absolute_claims=_absolute_claims(data, path),
        exclamation_policy=_get(data, "exclamation_policy", str, path).strip(),
        cta_phrases=_str_list(data, "cta_phrases", path),
        cta_patterns=[_compile(p, path, data.key_lines["cta_patterns"], "cta_patterns") for p in _str_list(data, "cta_patterns", path)],
        schema=ProductSchema(_composition(data, path), _fact_specs(data, path), _wording(data, path)),
        claim_lexicon=_claim_lexicon(data, path),
        claim_noun_after=_optional_pattern(data, "claim_noun_after", path),
        split_seed=_get(split, "seed", int, path, "split."),
        val_fraction=float(val_fraction),
    )
    return fields, data


def _optional_pattern(mapping, key, path, prefix=""):
    if key not in mapping:
        return None
    return _compile(_get(mapping, key, str, path, prefix), path, mapping.key_lines[key], prefix + key)


def _absolute_claims(data, path):
    claims = []
    for item in _get(data, "absolute_claims", list, path):
        if not isinstance(item, _LineDict):
            raise BrandDataError(path, data.key_lines["absolute_claims"], "absolute_claims", "expected {pattern, reason} items")
        pattern = _get(item, "pattern", str, path, "absolute_claims[].")
        claims.append((_compile(pattern, path, item.line, "absolute_claims[].pattern"), _get(item, "reason", str, path, "absolute_claims[].")))
    return claims


def _wording(data, path):
    raw = _get(data, "wording", dict, path)
    return Wording(**{key: _get(raw, key, str, path, "wording.") for key in ("expert", "fact_scope", "claims_label", "claim_word")})


def _composition(data, path):
    raw = _get(data, "composition", dict, path)
    prefix = "composition."
    return CompositionSpec(
        label=_get(raw, "label", str, path, prefix),
        material_word=_get(raw, "material_word", str, path, prefix),
        share_word=_get(raw, "share_word", str, path, prefix),
        undisclosed=_get(raw, "undisclosed", str, path, prefix),
        complete=_get(raw, "complete", bool, path, prefix),
        materials=_materials(raw, path),
        **{key: _optional_pattern(raw, key, path, prefix)
           for key in ("endogenous_before", "endogenous_after", "compound_before", "compound_after")},
    )


def _materials(composition, path):
    raw = _get(composition, "materials", dict, path, "composition.")
    lexicon = {}
    for name, spec in raw.items():
        prefix = f"composition.materials.{name}."
        if not isinstance(spec, _LineDict):
            raise BrandDataError(path, raw.key_lines[name], prefix[:-1], "expected a mapping with aliases")
        covers = tuple(_str_list(spec, "covers", path, prefix)) if "covers" in spec else ()
        endogenous = _get(spec, "endogenous", bool, path, prefix) if "endogenous" in spec else False
        aliases = tuple(_str_list(spec, "aliases", path, prefix)) if "aliases" in spec else ()
        lexicon[name] = MaterialEntry(name, aliases, covers, endogenous)
    for entry in lexicon.values():
        for member in entry.covers:
            if member not in lexicon or lexicon[member].covers:
                raise BrandDataError(path, raw[entry.name].key_lines["covers"], f"composition.materials.{entry.name}.covers", f"{member!r} is not a material of the lexicon")
    return lexicon


def _fact_specs(data, path):
    raw = _get(data, "facts", dict, path)
    return {fact_id: _fact_spec(fact_id, spec, raw, path) for fact_id, spec in raw.items()}


def _fact_spec(fact_id, spec, raw, path):
    prefix = f"facts.{fact_id}."
    if not isinstance(spec, _LineDict):
        raise BrandDataError(path, raw.key_lines[fact_id], prefix[:-1], "expected a mapping with label and type")
    kind = _get(spec, "type", str, path, prefix)
    if kind not in FACT_TYPES:
        raise BrandDataError(path, spec.key_lines["type"], prefix + "type", f"must be one of {FACT_TYPES}")
    values = {}
    if kind in ("enum", "set"):
        vocabulary = _get(spec, "values", dict, path, prefix)
        for value, phrases in vocabulary.items():
            if phrases is not None and not (isinstance(phrases, list) and all(isinstance(p, str) and p.strip() for p in phrases)):
                raise BrandDataError(path, vocabulary.key_lines[value], f"{prefix}values.{value}", "expected a list of phrases (or nothing)")
            values[str(value)] = tuple(phrases) if phrases else (str(value),)
    low_high = (0.0, math.inf)
    if "range" in spec:
        low_high = _get(spec, "range", list, path, prefix)
        if len(low_high) != 2 or not all(isinstance(n, (int, float)) for n in low_high) or low_high[0] >= low_high[1]:
            raise BrandDataError(path, spec.key_lines["range"], prefix + "range", "expected [low, high] with low < high")
    if kind == "number" and "phrases" not in spec:
        raise BrandDataError(path, spec.line, prefix + "phrases", "missing field (a number fact is read after its phrases)")
    return FactSpec(
        id=fact_id,
        label=_get(spec, "label", str, path, prefix),
        type=kind,
        phrases=tuple(_str_list(spec, "phrases", path, prefix)) if "phrases" in spec else (),
        units=tuple(_str_list(spec, "unit", path, prefix)) if "unit" in spec else (),
        range=(float(low_high[0]), float(low_high[1])),
        values=values,
        required=_get(spec, "required", bool, path, prefix) if "required" in spec else False,
        join=_get(spec, "join", str, path, prefix) if "join" in spec else "、",
    )


def _claim_lexicon(data, path):
    if "claim_lexicon" not in data:
        return {}
    raw = _get(data, "claim_lexicon", dict, path)
    return {claim: _str_list(raw, claim, path, "claim_lexicon.") for claim in raw}


# --- products.jsonl -----------------------------------------------------------------------


def _read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line (``files.parse_jsonl``), errors as BrandDataError."""
    text = _text(path)
    try:
        return parse_jsonl(path, text)
    except DataFileError as err:
        raise BrandDataError(path, err.line, None, f"malformed JSON line: {err.reason}") from None


def _text(path):
    """The file's text (UTF-8, a BOM dropped); other encodings are a BrandDataError naming the line."""
    try:
        return read_text(path)
    except NotUTF8Error as err:
        raise BrandDataError(path, err.line, None, err.reason) from None


def _require(obj, key, kind, path, number, nullable=False):
    """Returns ``obj[key]`` checked against ``kind`` for a JSONL record."""
    if key not in obj or (obj[key] is None and not nullable):
        raise BrandDataError(path, number, key, "missing field")
    value = obj[key]
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BrandDataError(path, number, key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    if kind is str and not value.strip():
        raise BrandDataError(path, number, key, "empty text")
    return value


def _text_list(obj, key, path, number):
    values = _require(obj, key, list, path, number)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise BrandDataError(path, number, key, "expected a non-empty list of non-empty strings")
    return tuple(values)


def _composition_parts(obj, path, number, spec):
    parts = []
    for i, raw in enumerate(_require(obj, "composition", list, path, number) if "composition" in obj else ()):
        name = f"composition[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("part"), str) or not isinstance(raw.get("materials"), list) or not raw["materials"]:
            raise BrandDataError(path, number, name, "expected {part, materials: [{name, share}, ...]}")
        materials = tuple(_material(item, path, number, f"{name}.materials[{j}]", spec) for j, item in enumerate(raw["materials"]))
        shares = [m.share for m in materials]
        if spec.complete and None not in shares and abs(sum(shares) - 100) > 0.01:
            raise BrandDataError(path, number, f"{name}.materials", f"shares of part {raw['part']!r} add up to {sum(shares):g}, not 100")
        parts.append(Part(raw["part"], materials))
    return tuple(parts)


def _material(item, path, number, name, spec):
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BrandDataError(path, number, name, "expected {name, share}")
    if item["name"] not in spec.materials or spec.materials[item["name"]].covers:
        raise BrandDataError(path, number, f"{name}.name", f"{item['name']!r} is not a material of brand.yaml's composition.materials")
    if "share" not in item:
        raise BrandDataError(path, number, f"{name}.share", "missing field (a percentage, or null when undisclosed)")
    share = item["share"]
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 100):
        raise BrandDataError(path, number, f"{name}.share", f"expected a percentage in (0, 100] or null, got {share!r}")
    note = item.get("note")
    if note is not None and not (isinstance(note, str) and note.strip()):
        raise BrandDataError(path, number, f"{name}.note", "expected a non-empty string")
    return Material(item["name"], None if share is None else float(share), note)


def _fact_value(value, spec, path, number):
    """Checks one fact value of a product against its FactSpec; returns it (lists as tuples)."""
    name = f"facts.{spec.id}"
    if spec.type == "number":
        ok = _number_ok(value, spec)
    elif spec.type == "enum":
        ok = isinstance(value, str) and value in spec.values
    elif spec.type == "set":
        ok = isinstance(value, list) and value and all(isinstance(v, str) and v in spec.values for v in value)
    else:
        ok = isinstance(value, str) and value.strip() or isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
    if not ok:
        raise BrandDataError(path, number, name, f"expected {_fact_expectation(spec)}, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _number_ok(value, spec):
    low, high = spec.range
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value.rstrip("+"))
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return low <= value[0] < value[1] <= high
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _fact_expectation(spec):
    if spec.type == "number":
        return f"a number in [{spec.range[0]:g}, {spec.range[1]:g}], a string like '50+' or a [low, high] range"
    if spec.type in ("enum", "set"):
        return f"{'one' if spec.type == 'enum' else 'a non-empty list'} of {', '.join(spec.values)}"
    return "a non-empty string or list of strings"


def _facts(obj, path, number, specs):
    raw = _require(obj, "facts", dict, path, number) if "facts" in obj else {}
    for key in raw:
        if key not in specs:
            raise BrandDataError(path, number, f"facts.{key}", f"not a fact of brand.yaml's facts; known: {', '.join(specs)}")
    for spec in specs.values():
        if spec.required and raw.get(spec.id) is None:
            raise BrandDataError(path, number, f"facts.{spec.id}", "missing field (required by brand.yaml)")
    return {key: _fact_value(value, specs[key], path, number) for key, value in raw.items() if value is not None}


def _product(obj, path, number, schema, claim_lexicon):
    claims = _text_list(obj, "claims", path, number) if "claims" in obj else ()
    for claim in claims:
        if claim not in claim_lexicon:
            raise BrandDataError(path, number, "claims", f"{claim!r} is not a canonical claim of brand.yaml's claim_lexicon")
    price = _require(obj, "price", (int, float), path, number)
    if price <= 0:
        raise BrandDataError(path, number, "price", "must be positive")
    return Product(
        id=_require(obj, "id", str, path, number),
        name=_require(obj, "name", str, path, number),
        category=_require(obj, "category", str, path, number),
        composition=_composition_parts(obj, path, number, schema.composition),
        claims=claims,
        facts=_facts(obj, path, number, schema.facts),
        size=_require(obj, "size", str, path, number),
        price=price,
        schema=schema,
    )


def load_products(path: str | Path, schema: ProductSchema, claim_lexicon: dict[str, list[str]]) -> dict[str, Product]:
    """Loads products.jsonl, checking composition, facts and claims against the brand's schema.

    Args:
        path: the products.jsonl file.
        schema: the brand's ProductSchema (materials, fact specs).
        claim_lexicon: the brand's claim lexicon (canonical claim -> phrases).

    Returns:
        dict of product id -> Product, in file order.

    Raises:
        BrandDataError: malformed line, missing field, unknown material, fact or claim, a value of the
            wrong type, shares of a complete part not adding up to 100, duplicate id.
    """
    products = {}
    for number, obj in _read_jsonl(path):
        product = _product(obj, path, number, schema, claim_lexicon)
        if product.id in products:
            raise BrandDataError(path, number, "id", f"duplicate product id {product.id!r}")
        products[product.id] = product
    if not products:
        raise BrandDataError(path, None, None, "no products")
    return products


# --- entry points -------------------------------------------------------------------------


def brand_dir(name_or_path: str | Path) -> Path:
    """Resolves a brand name under data/brands/ or a folder path to the brand folder."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    folder = DATA_DIR / "brands" / str(name_or_path)
    if not folder.is_dir():
        raise BrandDataError(name_or_path, None, None, f"no brand folder: neither {candidate} nor {folder} exists")
    return folder


def load_brand(name_or_path: str | Path) -> Brand:
    """Loads a brand folder and the shared content types.

    Args:
        name_or_path: a brand name under data/brands/ (``"yuansu"``) or a path to a brand folder.

    Returns:
        Brand with products and content types.

    Raises:
        BrandDataError: a missing file (named), malformed YAML or JSONL, a missing field, a
            product material, fact or claim the brand does not declare.
    """
    folder = brand_dir(name_or_path)
    for name in BRAND_FILES:
        if not (folder / name).is_file():
            raise BrandDataError(folder / name, None, None, f"brand folder {folder} is missing {name}")
    fields, data = _brand_fields(folder / "brand.yaml")
    products = load_products(folder / "products.jsonl", fields["schema"], fields["claim_lexicon"])
    content_types = _content_type_overrides(data, folder / "brand.yaml", load_content_types())
    return Brand(path=folder, products=products, content_types=content_types, **fields)


def read_records(path: str | Path, brand: Brand, require_text: bool = True) -> list[tuple[int, dict]]:
    """Reads and validates JSONL records that name a content type and optionally a product.

    Every line is validated before anything is returned, so a caller never acts on part of a
    bad file. Used for lint input and the golden set.

    Args:
        path: the JSONL file.
        brand: the Brand whose content types and products the records must name.
        require_text: whether each record needs a non-empty ``text``.

    Returns:
        list of (line number, record dict).

    Raises:
        BrandDataError: malformed line, missing field, unknown content_type or product_id, empty text.
    """
    records = []
    for number, obj in _read_jsonl(path):
        if require_text:
            _require(obj, "text", str, path, number)
        content_type = _require(obj, "content_type", str, path, number)
        if content_type not in brand.content_types:
            raise BrandDataError(path, number, "content_type", f"unknown content_type {content_type!r}")
        product_id = _require(obj, "product_id", str, path, number, nullable=True) if "product_id" in obj else None
        if product_id is not None and product_id not in brand.products:
            raise BrandDataError(path, number, "product_id", f"unknown product_id {product_id!r}")
        records.append((number, obj))
    return records


def load_golden(brand: Brand) -> list[dict]:
    """Loads ``golden.jsonl`` of a brand: records with id, product_id, content_type, instruction, text.

    Raises:
        BrandDataError: the file is missing or a record is malformed (file, line, field).
    """
    path = brand.path / "golden.jsonl"
    if not path.is_file():
        raise BrandDataError(path, None, None, f"brand folder {brand.path} is missing golden.jsonl")
    records = []
    for number, obj in read_records(path, brand):
        for key in ("id", "product_id", "instruction"):
            _require(obj, key, str, path, number)
        records.append(obj)
    return records
