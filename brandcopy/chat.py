"""Streaming terminal chat with the brand's system prompt, several adapters on one base.

The base model is loaded once; each adapter (one per brand or persona, or one per training stage)
is added with PEFT's ``load_adapter`` and switched with ``set_adapter``, so ``/adapter dpo``
takes effect at once without reloading anything. ``/adapter base`` talks to the base model with
the adapters disabled. The latest finished stage (grpo, else dpo, else sft) is active at start.

``/product ID`` and ``/type ID`` choose what to write; ``/write`` then starts a new conversation with
exactly the prompt training used (``prompts.chat_messages``: the product's facts and the content type's
brief), so the model sees what it learned from. Free lines continue the conversation.

Ctrl-C during a reply stops that reply (the generation thread is told to stop and joined); Ctrl-D or
``/exit`` ends the chat. In a terminal ``readline`` gives line editing and history.

Commands: ``/adapter NAME``, ``/adapters``, ``/product ID``, ``/products``, ``/type ID``, ``/types``, ``/write``,
``/reset`` (forget the conversation), ``/exit``.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from brandcopy.generation import GenerationParams
from brandcopy.modeling import fix_special_tokens, load_model
from brandcopy.prompts import chat_messages, system_prompt
from brandcopy.run import require_stage

BASE = "base"
CHAT_PARAMS = GenerationParams("chat", max_new_tokens=1024, do_sample=True, temperature=0.7, top_p=0.9)
STAGE_ORDER = ("sft", "dpo", "grpo")  # later stages start from earlier ones; the last finished one is the default
HELP = ("命令：/product 编号 选择产品（/products 列出），/type 编号 选择文案类型（/types 列出），"
        "/write 按训练时的提示写一条；/adapter 名称 切换适配器（base 为基座模型），/adapters 列出；"
        "/reset 清空对话，/exit 或 Ctrl-D 退出；回复中按 Ctrl-C 停止这条回复")


def run_adapters(run_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Adapter folders by name: a stage of the run (``sft``, ``dpo``, ``grpo``) or an adapter folder path.

    With no names, every finished adapter stage of the run.

    Raises:
        StageInputError: A named stage is missing or unfinished in the run.
    """
    if not names:
        names = [name for name in STAGE_ORDER if (Path(run_dir) / name / "manifest.json").is_file()]
    return {Path(name).name: _adapter_dir(run_dir, name) for name in names}


def _adapter_dir(run_dir: str | Path, name: str) -> Path:
    path = Path(name)
    if (path / "adapter_config.json").is_file():
        return path
    return require_stage(run_dir, name, "chat")


def load_chat_model(base_model: str | Path, adapters: dict[str, Path], **load_options):
    """Load the base once and attach every adapter under its name; the last one (the latest stage) is active.

    Args:
        base_model: Base model folder or hub id (what the adapters were trained on).
        adapters: Adapter name -> adapter folder; may be empty (base only).
        **load_options: ``backend``, ``load_in_4bit``, ``max_seq_length`` for ``modeling.load_model``.

    Returns:
        ``(model, tokenizer)``; the model is a ``PeftModel`` when adapters were given.
    """
    model, tokenizer = load_model(base_model, **load_options)
    fix_special_tokens(model, tokenizer)
    for number, (name, path) in enumerate(adapters.items()):
        if number == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    if adapters:
        model.set_adapter(list(adapters)[-1])
    model.eval()
    return model, tokenizer


def use_adapter(model, name: str) -> None:
    """Make ``name`` the active adapter (``base`` leaves them loaded and disables them per reply).

    Raises:
        KeyError: No adapter of that name is loaded.
    """
    if name == BASE:
        return
    loaded = list(model.peft_config) if isinstance(model, PeftModel) else []
    if name not in loaded:
        raise KeyError(f"没有名为「{name}」的适配器；已加载：{'、'.join([BASE, *loaded])}")
    model.set_adapter(name)


def _adapter_context(model, adapter: str):
    """Adapters disabled for ``base``; otherwise the active adapter as it is."""
    return model.disable_adapter() if adapter == BASE and isinstance(model, PeftModel) else contextlib.nullcontext()


@dataclass
class ServedModel:
    """A model behind an OpenAI-compatible endpoint (``vllm serve``, ``transformers serve``) to chat with.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: The name the server serves (``transformers serve``: the folder it loaded).
        api_key_env: NAME of the environment variable holding the server's key; None for none.

    Raises:
        LLMConfigError: ``api_key_env`` names a variable that is not set (checked when built).
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    _client: object = field(init=False, repr=False)

    def __post_init__(self):
        import openai

        from brandcopy.llm import LLMConfig, resolve_api_key

        key = resolve_api_key(LLMConfig(model=self.model, base_url=self.base_url, api_key_env=self.api_key_env))
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key)

    def stream(self, messages: list[dict], params: GenerationParams) -> Iterator[str]:
        """Yield the reply's text as the server streams it (the server applies the chat template)."""
        sampling = {"temperature": params.temperature, "top_p": params.top_p} if params.do_sample else {"temperature": 0.0}
        chunks = self._client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                      max_tokens=params.max_new_tokens, seed=params.seed, **sampling)
        for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content


class _StopOnEvent(StoppingCriteria):
    """Stops generation once ``event`` is set (Ctrl-C in the chat)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def stream_reply(
    model, tokenizer, messages: list[dict], adapter: str, params: GenerationParams = CHAT_PARAMS,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Yield the reply to ``messages`` piece by piece as it is generated.

    Generation runs in a worker thread feeding a ``TextIteratorStreamer``; an error there is
    raised here once the stream ends. If the consumer stops early (Ctrl-C raised while it handles a
    piece), ``stop`` is set so that generation ends at the next token, and the worker is joined before
    the exception propagates: no thread is left running.

    Args:
        model: The chat model (``PeftModel`` or plain).
        tokenizer: Its tokenizer.
        messages: The conversation so far, ending with the user turn.
        adapter: Active adapter name, or ``base`` to generate with adapters disabled.
        params: Decoding parameters.
        stop: Set to end generation early; a fresh event when None.
    """
    if isinstance(model, ServedModel):  # the server renders the template and generates
        yield from model.stream(messages, params)
        return
    stop = stop or threading.Event()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"temperature": params.temperature, "top_p": params.top_p} if params.do_sample else {}
    errors = []

    def generate() -> None:
        torch.manual_seed(params.seed)
        try:
            with torch.inference_mode(), _adapter_context(model, adapter):
                model.generate(**inputs, streamer=streamer, max_new_tokens=params.max_new_tokens,
                               do_sample=params.do_sample, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
        except Exception as err:  # re-raised in the caller's thread below
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()  # a no-op after a complete reply; ends generation after an interrupted one
        worker.join()
    if errors:
        raise errors[0]


@dataclass
class ChatState:
    """A conversation: its messages (system prompt first), the active adapter, and the chosen product and type."""

    messages: list[dict]
    adapter: str
    adapters: list[str] = field(default_factory=list)
    product_id: str | None = None
    content_type: str | None = None


def handle_command(model, state: ChatState, line: str, brand) -> str:
    """Apply one ``/command`` and return the line to show (Chinese, as the rest of the interface)."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command == "/adapter":
        try:
            use_adapter(model, argument)
        except KeyError as err:
            return f"[{err.args[0]}]"
        state.adapter = argument
        return f"[已切换到 {state.adapter}]"
    if command == "/adapters":
        return "[" + ", ".join(f"*{n}" if n == state.adapter else n for n in [BASE, *state.adapters]) + "]"
    if command == "/products":
        return "\n".join(f"  {p.id} {p.name}" for p in brand.products.values())
    if command == "/types":
        return "\n".join(f"  {t.id} {t.name_zh}" for t in brand.content_types.values())
    if command == "/product":
        if argument not in brand.products:
            return f"[没有编号为「{argument}」的产品；/products 列出全部]"
        state.product_id = argument
        return f"[产品：{argument} {brand.products[argument].name}]"
    if command == "/type":
        if argument not in brand.content_types:
            return f"[没有编号为「{argument}」的文案类型；/types 列出全部]"
        state.content_type = argument
        return f"[文案类型：{argument} {brand.content_types[argument].name_zh}]"
    if command == "/reset":
        state.messages = [{"role": "system", "content": system_prompt(brand)}]
        return "[对话已清空]"
    return HELP


def write_prompt(brand, state: ChatState) -> list[dict] | str:
    """The training prompt for the chosen product and type (a new conversation), or what is still missing."""
    if state.product_id is None or state.content_type is None:
        return "[先用 /product 和 /type 选择产品和文案类型]"
    return chat_messages(brand, state.product_id, state.content_type)


def _reply(model, tokenizer, state: ChatState, write, params) -> None:
    """Stream one labelled reply into the conversation; Ctrl-C stops it and keeps what was written."""
    pieces = []
    try:
        write(f"[{state.adapter}] 助手：")  # inside the try: Ctrl-C right after the label also stops only the reply
        with contextlib.closing(stream_reply(model, tokenizer, state.messages, state.adapter, params)) as stream:
            for piece in stream:
                pieces.append(piece)
                write(piece)
        write("\n")
    except KeyboardInterrupt:
        write("\n[已停止这条回复]\n")
    state.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def chat_loop(
    model,
    tokenizer,
    brand,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
    params: GenerationParams = CHAT_PARAMS,
) -> ChatState:
    """Chat until ``/exit`` or end of input (Ctrl-D), streaming every labelled reply through ``write``.

    Args:
        model: From ``load_chat_model``.
        tokenizer: Its tokenizer.
        brand: The loaded brand (its system prompt starts the conversation).
        read: Returns the next user line (``input`` in a terminal); EOFError ends the chat,
            KeyboardInterrupt at the prompt discards the line.
        write: Shows text as it arrives; a KeyboardInterrupt while a reply streams stops that reply.
        params: Decoding parameters.

    Returns:
        The final conversation state.
    """
    system = system_prompt(brand)
    adapters = list(model.peft_config) if isinstance(model, PeftModel) else []
    state = ChatState([{"role": "system", "content": system}], model.active_adapter if adapters else BASE, adapters)
    write(f"{brand.name} 文案助手，当前模型：{state.adapter}。{HELP}\n")
    while True:
        try:
            line = read(f"[{state.adapter}] 你：").strip()
        except EOFError:
            write("\n")  # Ctrl-D leaves the cursor after the prompt
            return state
        except KeyboardInterrupt:
            write("\n")
            continue
        if line in ("/exit", "/quit"):
            return state
        if line == "/write":
            prompt = write_prompt(brand, state)
            if isinstance(prompt, str):
                write(prompt + "\n")
                continue
            state.messages = prompt
            write(f"[按训练提示写：{prompt[-1]['content'][:60]}…]\n")
        elif line.startswith("/"):
            write(handle_command(model, state, line, brand) + "\n")
            continue
        elif not line:
            continue
        else:
            state.messages.append({"role": "user", "content": line})
        _reply(model, tokenizer, state, write, params)
