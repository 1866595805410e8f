"""Streaming terminal chat with the brand's system prompt, several adapters on one base.

The base model is loaded once; each adapter (one per brand or persona, or one per training stage)
is added with PEFT's ``load_adapter`` and switched with ``set_adapter``, so ``/adapter dpo``
takes effect at once without reloading anything. ``/adapter base`` talks to the base model with
the adapters disabled.

Commands: ``/adapter NAME``, ``/adapters``, ``/reset`` (forget the conversation), ``/exit``.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TextIteratorStreamer

from brandcopy.generation import GenerationParams
from brandcopy.modeling import fix_special_tokens, load_model
from brandcopy.prompts import system_prompt
from brandcopy.run import require_stage

BASE = "base"
CHAT_PARAMS = GenerationParams("chat", max_new_tokens=1024, do_sample=True, temperature=0.7, top_p=0.9)
HELP = "命令：/adapter 名称 切换适配器（base 为基座模型），/adapters 列出，/reset 清空对话，/exit 退出"


def run_adapters(run_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Adapter folders by name: a stage of the run (``sft``, ``dpo``, ``grpo``) or an adapter folder path.

    With no names, every finished adapter stage of the run.

    Raises:
        StageInputError: A named stage is missing or unfinished in the run.
    """
    if not names:
        names = [name for name in ("sft", "dpo", "grpo") if (Path(run_dir) / name / "manifest.json").is_file()]
    return {Path(name).name: _adapter_dir(run_dir, name) for name in names}


def _adapter_dir(run_dir: str | Path, name: str) -> Path:
    path = Path(name)
    if (path / "adapter_config.json").is_file():
        return path
    return require_stage(run_dir, name, "chat")


def load_chat_model(base_model: str | Path, adapters: dict[str, Path], **load_options):
    """Load the base once and attach every adapter under its name; the first is active.

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
        raise KeyError(f"no adapter {name!r}; loaded: {', '.join([BASE, *loaded])}")
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


def stream_reply(
    model, tokenizer, messages: list[dict], adapter: str, params: GenerationParams = CHAT_PARAMS
) -> Iterator[str]:
    """Yield the reply to ``messages`` piece by piece as it is generated.

    Generation runs in a worker thread feeding a ``TextIteratorStreamer``; an error there is
    raised here once the stream ends.

    Args:
        model: The chat model (``PeftModel`` or plain).
        tokenizer: Its tokenizer.
        messages: The conversation so far, ending with the user turn.
        adapter: Active adapter name, or ``base`` to generate with adapters disabled.
        params: Decoding parameters.
    """
    if isinstance(model, ServedModel):  # the server renders the template and generates
        yield from model.stream(messages, params)
        return
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
                               do_sample=params.do_sample,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
        except Exception as err:  # re-raised in the caller's thread below
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if errors:
        raise errors[0]


@dataclass
class ChatState:
    """A conversation: its messages (system prompt first) and the active adapter."""

    messages: list[dict]
    adapter: str
    adapters: list[str] = field(default_factory=list)


def handle_command(model, state: ChatState, line: str, system: str) -> str:
    """Apply one ``/command`` and return the line to show."""
    command, _, argument = line.partition(" ")
    if command == "/adapter":
        try:
            use_adapter(model, argument.strip())
        except KeyError as err:
            return str(err.args[0])
        state.adapter = argument.strip()
        return f"[已切换到 {state.adapter}]"
    if command == "/adapters":
        return "[" + ", ".join(f"*{n}" if n == state.adapter else n for n in [BASE, *state.adapters]) + "]"
    if command == "/reset":
        state.messages = [{"role": "system", "content": system}]
        return "[对话已清空]"
    return HELP


def chat_loop(
    model,
    tokenizer,
    brand,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
    params: GenerationParams = CHAT_PARAMS,
) -> ChatState:
    """Chat until ``/exit`` or end of input, streaming every reply through ``write``.

    Args:
        model: From ``load_chat_model``.
        tokenizer: Its tokenizer.
        brand: The loaded brand (its system prompt starts the conversation).
        read: Returns the next user line (``input`` in a terminal); EOFError ends the chat.
        write: Shows text as it arrives.
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
            return state
        if line in ("/exit", "/quit"):
            return state
        if line.startswith("/"):
            write(handle_command(model, state, line, system) + "\n")
            continue
        if not line:
            continue
        state.messages.append({"role": "user", "content": line})
        reply = []
        for piece in stream_reply(model, tokenizer, state.messages, state.adapter, params):
            reply.append(piece)
            write(piece)
        write("\n")
        state.messages.append({"role": "assistant", "content": "".join(reply).strip()})
