"""Every prompt string the library sends: system prompt, user instruction, chat messages.

The user instruction carries the product facts (composition with shares, allowed claims, the
brand's typed facts, size and price) so that a fine-tuned model sees them at inference, exactly as
in training. Labels and vocabulary come from the brand's folder (brand.yaml's ``wording``,
``composition`` and ``facts``); nothing here is specific to one industry. ``build_instruction`` is deterministic: golden.jsonl stores its output verbatim.
Generation, cleaning and negative prompts (datagen) are added below the chat section.
"""

from brandcopy.brand import Brand, Product


def system_prompt(brand: Brand) -> str:
    """The brand's system prompt: persona, philosophy and tone rules, in Chinese.

    Args:
        brand: a loaded Brand.

    Returns:
        The system message text.
    """
    rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(brand.tone_rules, start=1))
    share, material = brand.composition.share_word, brand.composition.material_word
    return (
        f"你是{brand.name}（{brand.name_en}）的品牌文案撰写人。品牌理念：{brand.philosophy}。\n"
        f"人设：{brand.persona}\n"
        f"写作规则：\n{rules}\n"
        f"{len(brand.tone_rules) + 1}. {brand.exclamation_policy}\n"
        f"{len(brand.tone_rules) + 2}. 只写产品信息中给出的{brand.wording.fact_scope}；"
        f"产品信息未给出{share}的{material}，不写{share}。\n"
        f"{len(brand.tone_rules) + 3}. 直接输出文案正文，不加标题标签、Markdown符号或任何说明。"
    )


def _material_line(material, spec, alone):
    detail = [material.note] if material.note else []
    if material.share is None and not alone:  # a part of one material needs no share
        detail.append(spec.undisclosed)
    text = material.name if material.share is None else f"{material.name} {material.share:g}%"
    return f"{text}（{'，'.join(detail)}）" if detail else text


def product_facts(product: Product) -> str:
    """The product facts block of an instruction, one fact per line, with the brand's labels.

    Order: category, composition (one line per part), claims, the brand's facts in brand.yaml
    order (those the product states), size and price.
    """
    schema = product.schema
    lines = [f"品类：{product.category}"]
    for part in product.composition:
        label = schema.composition.label if len(product.composition) == 1 else f"{schema.composition.label}（{part.name}）"
        lines.append(f"{label}：{'；'.join(_material_line(m, schema.composition, len(part.materials) == 1) for m in part.materials)}")
    if product.claims:
        lines.append(f"{schema.wording.claims_label}：{'、'.join(product.claims)}")
    lines += [f"{spec.label}：{spec.display(product.facts[key])}" for key, spec in schema.facts.items() if key in product.facts]
    lines.append(f"规格与价格：{product.size}，{product.price:g}元")
    return "\n".join(f"- {line}" for line in lines)


def build_instruction(brand: Brand, product_id: str, content_type: str) -> str:
    """The user instruction for one (product, content type): task, requirements and product facts.

    Args:
        brand: a loaded Brand.
        product_id: a product id of the brand's catalog (``"YS-001"``).
        content_type: a content type id (``"paid_ad_fab"``).

    Returns:
        The instruction text; the same arguments always give the same text.

    Raises:
        KeyError: unknown product_id or content_type.
    """
    product = brand.product(product_id)
    spec = brand.content_type(content_type)
    low, high = spec.length
    parts = [
        f"请为{brand.name}「{product.name}」撰写{spec.name_zh}。",
        spec.instruction,
        f"篇幅：{low}–{high}字（不计空白）。",
    ]
    if spec.cta_required:
        parts.append(f"结尾需要明确的行动号召，例如：{'；'.join(brand.cta_phrases[:3])}。")
    parts.append(f"产品信息：\n{product_facts(product)}")
    return "\n".join(parts)


def chat_messages(brand: Brand, product_id: str, content_type: str, text: str | None = None) -> list[dict[str, str]]:
    """System and user messages for one (product, content type), plus the assistant copy if given.

    Args:
        brand: a loaded Brand.
        product_id: a product id of the brand's catalog.
        content_type: a content type id.
        text: the copy, appended as the assistant message (training); None for a prompt.

    Returns:
        list of ``{"role", "content"}`` dicts.
    """
    messages = [
        {"role": "system", "content": system_prompt(brand)},
        {"role": "user", "content": build_instruction(brand, product_id, content_type)},
    ]
    if text is not None:
        messages.append({"role": "assistant", "content": text})
    return messages


# --- data generation prompts (datagen.py) -------------------------------------------------


GENERATE, REPAIR, EXAGGERATED, FAKE = "生成", "修改", "反例-夸大", "反例-失实"
CLEAN_PASSES = {  # pass name -> (task label, what the rewrite must do)
    "markup": ("清洗-去标记", "删除原文中残留的标签、标题标记、Markdown符号、方括号或括号里的写作说明、“文案：”之类的提示词等非正文内容；正文措辞保持不变。"),
    "persona": ("清洗-人设故事", "这篇笔记读起来平淡，像产品说明书。请用品牌人设的第一人称（“我”）重写：加入一个具体的场景或小故事（例如一位读者的困扰、一次产品测试或自己的使用经历），让读者读到真实的人和经历；事实保持不变。"),
    "cta": ("清洗-补充行动号召", "这篇广告缺少行动号召。请在结尾补上一句明确的行动号召，其余内容保持不变。"),
}


def _task_header(task, product_id, content_type):
    """The first lines of every datagen prompt: the task label and the ids it concerns."""
    return f"任务：{task}\n产品编号：{product_id}\n文案类型：{content_type}\n"


def _source_block(text):
    return f"【原文】\n{text}\n【原文结束】\n"


def _guide(brand, spec):
    structure = "\n".join(f"{i}. {step}" for i, step in enumerate(spec.structure, start=1))
    claims = "、".join(dict.fromkeys(reason.split("（")[0] for _, reason in brand.absolute_claims))
    return (
        f"本类文案的目的：{spec.purpose}\n结构：\n{structure}\n"
        f"鼓励使用的词：{'、'.join(brand.encouraged_words)}\n"
        f"禁止使用的词：{'、'.join(brand.banned_words)}\n"
        f"禁止的表述：{claims}\n"
        f"可用的行动号召：{'；'.join(brand.cta_phrases)}\n"
    )


def generation_messages(brand: Brand, product_id: str, content_type: str, examples: list[str],
                        variant: int = 0) -> list[dict[str, str]]:
    """Messages asking a teacher model for one piece of copy (datagen step 1).

    What requests share comes first and what varies comes last, so that a provider's prompt
    cache (DeepSeek, OpenAI) or vLLM's prefix cache can reuse the shared prefix: the system
    prompt (every request), the content type's guide and the few-shot examples (every product of
    that content type), then the task header, the instruction with the product facts and the
    variant line (this request only).

    Args:
        brand: a loaded Brand.
        product_id: the product to write about.
        content_type: a content type id.
        examples: golden copy texts of the same content type (other products) shown as style models.
        variant: 0 for the first sample of this pair; n > 0 asks for another angle.

    Returns:
        System and user messages.
    """
    spec = brand.content_type(content_type)
    shots = "".join(f"【范例{i}】\n{text}\n" for i, text in enumerate(examples, start=1))
    user = _guide(brand, spec)
    if shots:
        user += f"参考范例（来自其他产品：只学习结构与语气，不要照搬其中的{brand.wording.fact_scope}）：\n{shots}"
    user += _task_header(GENERATE, product_id, content_type) + build_instruction(brand, product_id, content_type) + "\n"
    if variant:
        user += f"这是同一产品的第{variant + 1}篇，请换一个切入角度和开头。\n"
    user += "只输出文案正文。"
    teacher = f"你同时是一位{brand.wording.expert}：写完后逐条核对产品信息，确保每一处{brand.wording.fact_scope}都有出处。"
    return [{"role": "system", "content": system_prompt(brand) + "\n" + teacher}, {"role": "user", "content": user}]


def repair_messages(messages: list[dict[str, str]], text: str, problems: list[str]) -> list[dict[str, str]]:
    """Continues a generation conversation asking to fix the problems lint found.

    Args:
        messages: the messages that produced ``text``.
        text: the rejected copy.
        problems: one line per problem (kind, message, offending span).

    Returns:
        The conversation plus the rejected answer and a repair request.
    """
    listed = "\n".join(f"- {problem}" for problem in problems)
    ask = (
        f"任务：{REPAIR}\n这篇文案有以下问题：\n{listed}\n"
        "请逐条修正，其余内容尽量保持不变；只写产品信息中给出的事实。只输出修改后的完整文案。"
    )
    return messages + [{"role": "assistant", "content": text}, {"role": "user", "content": ask}]


def clean_messages(brand: Brand, product_id: str, content_type: str, text: str, pass_name: str) -> list[dict[str, str]]:
    """Messages asking for one cleaning rewrite (datagen step 2).

    Args:
        brand: a loaded Brand.
        product_id: the product the copy is about.
        content_type: a content type id.
        text: the copy to rewrite.
        pass_name: a key of ``CLEAN_PASSES`` (markup, persona, cta).

    Returns:
        System and user messages.
    """
    task, ask = CLEAN_PASSES[pass_name]
    user = (  # shared first (guide of the content type, the pass's ask), this sample's part last
        _guide(brand, brand.content_type(content_type))
        + ask
        + f"\n不得加入产品信息以外的{brand.wording.fact_scope}，不得使用禁用词、绝对化用语和多个感叹号。只输出改写后的完整文案。\n"
        + _task_header(task, product_id, content_type)
        + build_instruction(brand, product_id, content_type) + "\n"
        + _source_block(text)
    )
    return [{"role": "system", "content": system_prompt(brand)}, {"role": "user", "content": user}]


def weak_messages(brand: Brand, product_id: str, content_type: str) -> list[dict[str, str]]:
    """A deliberately weak prompt (no guide, no facts, no system prompt) for 'weak' negatives."""
    product = brand.product(product_id)
    return [{"role": "user", "content": f"写一段「{product.name}」的{brand.content_type(content_type).name_zh}。"}]


def exaggerated_messages(brand: Brand, product_id: str, content_type: str, text: str) -> list[dict[str, str]]:
    """Asks to rewrite good copy into the exaggerated style the brand bans (a negative sample)."""
    user = (  # the ask is the same for every sample: it comes first, the sample last
        "请把下面的文案改写成夸张的营销风格，用作训练模型的反例：至少加入两个这些词："
        + "、".join(brand.banned_words[:12])
        + "；加入绝对化承诺（如“最有效”“100%见效”“立刻见效”“根治”）；使用多个感叹号。只输出改写后的文案。\n"
        + _task_header(EXAGGERATED, product_id, content_type)
        + _source_block(text)
    )
    return [{"role": "user", "content": user}]


def fake_messages(brand: Brand, product_id: str, content_type: str, text: str,
                  foreign_ingredient: str) -> list[dict[str, str]]:
    """Asks to plant 1-2 factual errors in good copy (a negative sample).

    Args:
        brand: a loaded Brand.
        product_id: the product the copy is about.
        content_type: a content type id.
        text: the correct copy.
        foreign_ingredient: a material of the brand's lexicon the product does not contain, offered as one error.

    Returns:
        The user message.
    """
    material, share = brand.composition.material_word, brand.composition.share_word
    user = (  # the ask is the same for every sample of a brand: it comes first, the sample and its facts last
        f"请在下面的文案中植入1–2处与产品信息不符的事实错误，用作训练模型的反例：例如改动某个{material}的{share}或某项数字，"
        + f"或写入产品并不含有的{material}。其余部分保持不变，不要标注改动之处。只输出改写后的文案。\n"
        + _task_header(FAKE, product_id, content_type)
        + f"产品信息：\n{product_facts(brand.product(product_id))}\n"
        + f"可植入的{material}（产品并不含有）：{foreign_ingredient}\n"
        + _source_block(text)
    )
    return [{"role": "user", "content": user}]
