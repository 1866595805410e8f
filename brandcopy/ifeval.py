"""A general-ability regression check: Chinese instruction following, verified by code (IFEval style).

Fine-tuning on one brand's copy can break a model's ordinary instruction following: it starts
writing brand copy whatever it is asked, ignores a length limit or a format. ``data/ifeval_zh.jsonl``
holds general prompts (nothing about any brand), each with constraints that code can check: a length
range, required or forbidden words, a number of paragraphs, bullet or numbered lines, a JSON shape,
no exclamation marks, a start or end phrase, a keyword count, no Latin letters, a 《title》, no
commas, text wrapped in given brackets. One verifier per constraint type.

Scores follow IFEval (Zhou et al., 2023): *strict* checks the response as written; *loose* also
accepts it after removing its first line, its last line, or both, and after removing Markdown
``*`` (a preamble such as "好的，以下是……" or a closing remark should not fail a format check).
Prompt-level accuracy counts prompts whose every constraint passed; instruction-level counts
constraints.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from brandcopy.files import DataFileError, jsonl_rows
from brandcopy.generation import GenerationParams, generate_batch
from brandcopy.lint import copy_length

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "ifeval_zh.jsonl"
PARAMS = GenerationParams("ifeval", max_new_tokens=512)  # greedy: the check measures the weights, not luck


class IFEvalDataError(ValueError):
    """A malformed line of the prompt file; the message names file, line and field."""


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_length(text: str, min: int, max: int) -> bool:
    """Characters without whitespace within [min, max] (the unit of the brand's length rules too)."""
    return min <= copy_length(text) <= max


def check_include(text: str, words: list[str]) -> bool:
    """Every word occurs."""
    return all(word in text for word in words)


def check_exclude(text: str, words: list[str]) -> bool:
    """No word occurs."""
    return not any(word in text for word in words)


def check_paragraphs(text: str, count: int) -> bool:
    """Exactly ``count`` paragraphs separated by blank lines."""
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]) == count


def check_bullets(text: str, count: int) -> bool:
    """Exactly ``count`` lines that start with ``- `` (or ``* ``, ``• ``)."""
    return sum(bool(re.match(r"[-*•]\s", line)) for line in _lines(text)) == count


def check_numbered(text: str, count: int) -> bool:
    """Numbered lines ``1.`` … ``count.`` in order (``1、`` and full-width ``1．`` accepted), no others."""
    numbers = [int(m.group(1)) for line in _lines(text) if (m := re.match(r"(\d+)\s*[.、．)]", line))]
    return numbers == list(range(1, count + 1))


def check_json(text: str, keys: list[str]) -> bool:
    """The whole response (a code fence around it allowed) is one JSON object with every key."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def check_no_exclamation(text: str) -> bool:
    """No ``!`` or ``！``."""
    return "!" not in text and "！" not in text


def check_start_with(text: str, phrase: str) -> bool:
    """The response starts with ``phrase``."""
    return text.strip().startswith(phrase)


def check_end_with(text: str, phrase: str) -> bool:
    """The response ends with ``phrase``."""
    return text.strip().endswith(phrase)


def check_keyword_count(text: str, word: str, min: int) -> bool:
    """``word`` occurs at least ``min`` times."""
    return text.count(word) >= min


def check_no_latin(text: str) -> bool:
    """No Latin letters (ASCII or full-width)."""
    return re.search(r"[A-Za-zＡ-Ｚａ-ｚ]", text) is None


def check_title(text: str) -> bool:
    """A title in 《》."""
    return re.search(r"《[^《》\n]+》", text) is not None


def check_no_comma(text: str) -> bool:
    """No ``，``, ``,`` or ``、``."""
    return not any(mark in text for mark in "，,、")


def check_wrap(text: str, left: str, right: str) -> bool:
    """The whole response is wrapped in ``left`` … ``right``."""
    text = text.strip()
    return len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right)


VERIFIERS = {  # constraint type -> (verifier, its argument names)
    "length": (check_length, ("min", "max")),
    "include": (check_include, ("words",)),
    "exclude": (check_exclude, ("words",)),
    "paragraphs": (check_paragraphs, ("count",)),
    "bullets": (check_bullets, ("count",)),
    "numbered": (check_numbered, ("count",)),
    "json": (check_json, ("keys",)),
    "no_exclamation": (check_no_exclamation, ()),
    "start_with": (check_start_with, ("text",)),  # arguments are passed by position, so "text" names the phrase
    "end_with": (check_end_with, ("text",)),
    "keyword_count": (check_keyword_count, ("word", "min")),
    "no_latin": (check_no_latin, ()),
    "title": (check_title, ()),
    "no_comma": (check_no_comma, ()),
    "wrap": (check_wrap, ("left", "right")),
}


def verify(text: str, constraint: dict) -> bool:
    """Whether ``text`` satisfies one constraint (``{"type": ..., **arguments}``)."""
    check, names = VERIFIERS[constraint["type"]]
    return check(text, *(constraint[name] for name in names))


def loose_variants(text: str) -> list[str]:
    """The response and the variants IFEval's loose score also accepts."""
    lines = text.split("\n")
    cuts = [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return [variant for cut in cuts for variant in (cut, cut.replace("*", ""))]


def verify_loose(text: str, constraint: dict) -> bool:
    """The constraint holds for the response or one of its non-empty loose variants (so loose >= strict)."""
    return verify(text, constraint) or any(verify(v, constraint) for v in loose_variants(text) if v.strip())


# --- the prompt file -------------------------------------------------------------------------------

ARGUMENT_TYPES = {"min": int, "max": int, "count": int, "words": list, "keys": list, "text": str, "word": str,
                  "left": str, "right": str}


@dataclass
class IFEvalPrompt:
    """One prompt: ``id``, the user ``prompt`` and its ``constraints`` (``{"type": ..., **arguments}``)."""

    id: str
    prompt: str
    constraints: list[dict]


def _check_constraint(where: str, constraint) -> None:
    if not isinstance(constraint, dict) or constraint.get("type") not in VERIFIERS:
        kind = constraint.get("type") if isinstance(constraint, dict) else constraint
        raise IFEvalDataError(f"{where}.type: unknown constraint {kind!r}; known: {', '.join(VERIFIERS)}")
    for name in VERIFIERS[constraint["type"]][1]:
        if not isinstance(constraint.get(name), ARGUMENT_TYPES[name]) or isinstance(constraint.get(name), bool):
            raise IFEvalDataError(f"{where}.{name}: expected {ARGUMENT_TYPES[name].__name__}, got {constraint.get(name)!r}")


def load_prompts(path: str | Path = DEFAULT_PATH, max_prompts: int = 0) -> list[IFEvalPrompt]:
    """Reads and validates the prompt file (the first ``max_prompts`` when positive).

    Raises:
        IFEvalDataError: A line that is not JSON, lacks a field, repeats an id, or has an unknown
            constraint type or a wrong argument; the message names file, line and field.
    """
    path, prompts, seen = Path(path), [], set()
    try:
        rows = jsonl_rows(path)
    except DataFileError as err:
        raise IFEvalDataError(str(err)) from None
    for number, row in rows:
        where = f"{path}:{number}"
        for name, kind in (("id", str), ("prompt", str), ("constraints", list)):
            if not isinstance(row.get(name), kind) or not row[name]:
                raise IFEvalDataError(f"{where}: field '{name}' must be a non-empty {kind.__name__}")
        if row["id"] in seen:
            raise IFEvalDataError(f"{where}: field 'id': duplicate id {row['id']!r}")
        seen.add(row["id"])
        for index, constraint in enumerate(row["constraints"]):
            _check_constraint(f"{where}: field 'constraints[{index}]'", constraint)
        prompts.append(IFEvalPrompt(row["id"], row["prompt"], row["constraints"]))
    return prompts[:max_prompts] if max_prompts > 0 else prompts


# --- scoring -------------------------------------------------------------------------------------


def score_response(prompt: IFEvalPrompt, text: str) -> dict:
    """Per-constraint strict and loose results of one response."""
    return {"id": prompt.id, "text": text, "types": [c["type"] for c in prompt.constraints],
            "strict": [verify(text, c) for c in prompt.constraints],
            "loose": [verify_loose(text, c) for c in prompt.constraints]}


def pass_rates(scored: list[dict]) -> dict[str, float]:
    """Prompt-level and instruction-level strict / loose accuracy over scored responses."""
    rates = {}
    for mode in ("strict", "loose"):
        rates[f"prompt_{mode}"] = sum(all(s[mode]) for s in scored) / len(scored)
        flat = [ok for s in scored for ok in s[mode]]
        rates[f"instruction_{mode}"] = sum(flat) / len(flat)
    return rates


def run_ifeval(model, tokenizer, prompts: list[IFEvalPrompt], params: GenerationParams = PARAMS,
               batch_size: int = 8) -> tuple[dict[str, float], list[dict]]:
    """Generates one response per prompt (a plain user turn, no brand system prompt) and scores it.

    Returns:
        The pass rates and the scored responses.
    """
    messages = [[{"role": "user", "content": p.prompt}] for p in prompts]
    generations = generate_batch(model, tokenizer, messages, params, batch_size)
    scored = [score_response(p, g.text) for p, g in zip(prompts, generations)]
    return pass_rates(scored), scored


def regressions(rates: dict[str, dict[str, float]], margin: float, base: str = "base") -> dict[str, float]:
    """Models whose prompt-level strict rate is more than ``margin`` below the base's: model -> drop."""
    if base not in rates:
        return {}
    reference = rates[base]["prompt_strict"]
    drops = {name: reference - r["prompt_strict"] for name, r in rates.items() if name != base}
    return {name: drop for name, drop in drops.items() if drop > margin}
