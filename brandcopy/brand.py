"""Loading a brand: style guide, shared content types, product catalog, golden set, split.

A brand is a folder ``data/brands/<name>/`` with ``brand.yaml`` and ``products.jsonl`` (and,
once written, ``golden.jsonl``); the nine content types are shared by every brand and live in
``data/content_types.yaml``. Every malformed input raises :class:`BrandDataError` naming the
file, the line and the field. See docs/architecture.md for the data contracts.
"""

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from brandcopy.config import NotUTF8Error, read_text

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CONTENT_TYPES_PATH = DATA_DIR / "content_types.yaml"
BRAND_FILES = ("brand.yaml", "products.jsonl")
FAMILIES = ("social", "ecommerce", "paid_ad")
MIN_VAL_FRACTION = 0.15
_CONCENTRATION = re.compile(r"^\d+(?:\.\d+)?%$")


class BrandDataError(ValueError):
    """Bad brand data or bad records: says which file, line and field."""

    def __init__(self, path, line, field_name, message):
        self.path, self.line, self.field = str(path), line, field_name
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: field '{field_name}': {message}" if field_name else f"{where}: {message}")


@dataclass(frozen=True)
class Ingredient:
    """One ingredient of a product; ``concentration`` is None when the brand does not disclose it."""

    name: str
    concentration: str | None
    note: str | None = None


@dataclass(frozen=True)
class Product:
    """One catalog entry (a line of products.jsonl)."""

    id: str
    name: str
    category: str
    registration: str
    ingredients: tuple[Ingredient, ...]
    claims: tuple[str, ...]
    skin_types: tuple[str, ...]
    texture: str
    usage: str
    cautions: tuple[str, ...]
    size: str
    price: float
    spf: str | None = None
    pa: str | None = None

    def ingredient(self, name):
        """Returns the product's Ingredient called ``name`` (canonical name), or None."""
        return next((i for i in self.ingredients if i.name == name), None)


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


@dataclass(frozen=True)
class LexiconEntry:
    """An ingredient the fact check recognises.

    ``covers`` is set for a family name such as 胜肽; ``endogenous`` marks substances the skin
    itself contains (神经酰胺, 透明质酸), which a text may discuss physiologically.
    """

    name: str
    inci: str | None
    aliases: tuple[str, ...]
    covers: tuple[str, ...] = ()
    endogenous: bool = False


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
    ingredient_lexicon: dict[str, LexiconEntry]
    claim_lexicon: dict[str, list[str]]
    split_seed: int
    val_fraction: float
    products: dict[str, Product] = field(default_factory=dict)
    content_types: dict[str, ContentType] = field(default_factory=dict)

    def product(self, product_id):
        """Returns the Product with this id; raises KeyError naming the id when unknown."""
        if product_id not in self.products:
            raise KeyError(f"unknown product_id {product_id!r} for brand {self.name}")
        return self.products[product_id]

    def content_type(self, content_type):
        """Returns the ContentType with this id; raises KeyError naming the id when unknown."""
        if content_type not in self.content_types:
            raise KeyError(f"unknown content_type {content_type!r}; known: {', '.join(self.content_types)}")
        return self.content_types[content_type]

    def split(self):
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


def load_content_types(path=CONTENT_TYPES_PATH):
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
    )


# --- brand.yaml ---------------------------------------------------------------------------


def _brand_fields(path):
    """Reads brand.yaml into the keyword arguments of Brand (without products and types)."""
    data = _read_yaml(path)
    split = _get(data, "split", dict, path)
    val_fraction = _get(split, "val_fraction", (int, float), path, "split.")
    if not MIN_VAL_FRACTION <= val_fraction < 1:
        raise BrandDataError(path, split.key_lines["val_fraction"], "split.val_fraction", f"must be in [{MIN_VAL_FRACTION}, 1)")
    return dict(
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
        ingredient_lexicon=_ingredient_lexicon(data, path),
        claim_lexicon=_claim_lexicon(data, path),
        split_seed=_get(split, "seed", int, path, "split."),
        val_fraction=float(val_fraction),
    )


def _absolute_claims(data, path):
    claims = []
    for item in _get(data, "absolute_claims", list, path):
        if not isinstance(item, _LineDict):
            raise BrandDataError(path, data.key_lines["absolute_claims"], "absolute_claims", "expected {pattern, reason} items")
        pattern = _get(item, "pattern", str, path, "absolute_claims[].")
        claims.append((_compile(pattern, path, item.line, "absolute_claims[].pattern"), _get(item, "reason", str, path, "absolute_claims[].")))
    return claims


def _ingredient_lexicon(data, path):
    raw = _get(data, "ingredient_lexicon", dict, path)
    lexicon = {}
    for name, spec in raw.items():
        prefix = f"ingredient_lexicon.{name}."
        if not isinstance(spec, _LineDict):
            raise BrandDataError(path, raw.key_lines[name], prefix[:-1], "expected a mapping with aliases")
        covers = tuple(_str_list(spec, "covers", path, prefix)) if "covers" in spec else ()
        inci = _get(spec, "inci", str, path, prefix) if not covers else None
        endogenous = _get(spec, "endogenous", bool, path, prefix) if "endogenous" in spec else False
        lexicon[name] = LexiconEntry(name, inci, tuple(_str_list(spec, "aliases", path, prefix)), covers, endogenous)
    for entry in lexicon.values():
        for member in entry.covers:
            if member not in lexicon or lexicon[member].covers:
                raise BrandDataError(path, raw[entry.name].key_lines["covers"], f"ingredient_lexicon.{entry.name}.covers", f"{member!r} is not an ingredient of the lexicon")
    return lexicon


def _claim_lexicon(data, path):
    raw = _get(data, "claim_lexicon", dict, path)
    return {claim: _str_list(raw, claim, path, "claim_lexicon.") for claim in raw}


# --- products.jsonl -----------------------------------------------------------------------


def _read_jsonl(path):
    """Yields (line number, object) for each non-blank line; raises on malformed JSON."""
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise BrandDataError(path, number, None, f"malformed JSON line: {err.msg} (column {err.colno})") from err
        if not isinstance(obj, dict):
            raise BrandDataError(path, number, None, "expected a JSON object")
        yield number, obj


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


def _product(obj, path, number, lexicon, claim_lexicon):
    ingredients = []
    for i, item in enumerate(_require(obj, "ingredients", list, path, number)):
        name = f"ingredients[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BrandDataError(path, number, name, "expected {name, concentration}")
        if item["name"] not in lexicon or lexicon[item["name"]].covers:
            raise BrandDataError(path, number, f"{name}.name", f"{item['name']!r} is not an ingredient of brand.yaml's ingredient_lexicon")
        if "concentration" not in item:
            raise BrandDataError(path, number, f"{name}.concentration", "missing field (use null when undisclosed)")
        conc = item["concentration"]
        if conc is not None and not (isinstance(conc, str) and _CONCENTRATION.match(conc)):
            raise BrandDataError(path, number, f"{name}.concentration", f"expected a string like '5%' or null, got {conc!r}")
        ingredients.append(Ingredient(item["name"], conc, item.get("note")))
    if not ingredients:
        raise BrandDataError(path, number, "ingredients", "a product needs at least one ingredient")
    claims = _text_list(obj, "claims", path, number)
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
        registration=_require(obj, "registration", str, path, number),
        ingredients=tuple(ingredients),
        claims=claims,
        skin_types=_text_list(obj, "skin_types", path, number),
        texture=_require(obj, "texture", str, path, number),
        usage=_require(obj, "usage", str, path, number),
        cautions=_text_list(obj, "cautions", path, number),
        size=_require(obj, "size", str, path, number),
        price=price,
        spf=_require(obj, "spf", str, path, number, nullable=True) if "spf" in obj else None,
        pa=_require(obj, "pa", str, path, number, nullable=True) if "pa" in obj else None,
    )


def load_products(path, lexicon, claim_lexicon):
    """Loads products.jsonl, checking every ingredient and claim against the lexicons.

    Args:
        path: the products.jsonl file.
        lexicon: the brand's ingredient lexicon (name -> LexiconEntry).
        claim_lexicon: the brand's claim lexicon (canonical claim -> phrases).

    Returns:
        dict of product id -> Product, in file order.

    Raises:
        BrandDataError: malformed line, missing field, unknown ingredient or claim, duplicate id.
    """
    products = {}
    for number, obj in _read_jsonl(path):
        product = _product(obj, path, number, lexicon, claim_lexicon)
        if product.id in products:
            raise BrandDataError(path, number, "id", f"duplicate product id {product.id!r}")
        products[product.id] = product
    if not products:
        raise BrandDataError(path, None, None, "no products")
    return products


# --- entry points -------------------------------------------------------------------------


def brand_dir(name_or_path):
    """Resolves a brand name under data/brands/ or a folder path to the brand folder."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    folder = DATA_DIR / "brands" / str(name_or_path)
    if not folder.is_dir():
        raise BrandDataError(name_or_path, None, None, f"no brand folder: neither {candidate} nor {folder} exists")
    return folder


def load_brand(name_or_path):
    """Loads a brand folder and the shared content types.

    Args:
        name_or_path: a brand name under data/brands/ (``"yuansu"``) or a path to a brand folder.

    Returns:
        Brand with products and content types.

    Raises:
        BrandDataError: a missing file (named), malformed YAML or JSONL, a missing field, a
            product ingredient or claim the lexicons do not define.
    """
    folder = brand_dir(name_or_path)
    for name in BRAND_FILES:
        if not (folder / name).is_file():
            raise BrandDataError(folder / name, None, None, f"brand folder {folder} is missing {name}")
    fields = _brand_fields(folder / "brand.yaml")
    products = load_products(folder / "products.jsonl", fields["ingredient_lexicon"], fields["claim_lexicon"])
    return Brand(path=folder, products=products, content_types=load_content_types(), **fields)


def read_records(path, brand, require_text=True):
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


def load_golden(brand):
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
