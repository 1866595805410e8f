"""The tiny local model: a 2-layer Qwen2 with a tokenizer trained on the given text.

``build_tiny_model`` writes a stand-in for Qwen2.5-7B-Instruct that loads offline (tests and the
CPU demo): the same tokenizer class, special tokens, chat template and generation config, a few
megabytes of weights, optionally pre-trained for a few steps on the domain's text.
"""

import json
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from brandcopy.files import atomic_dir, weights_follow_umask
from brandcopy.modeling import END_OF_TURN, ENDOFTEXT

CHATML_SPECIAL_TOKENS = [ENDOFTEXT, "<|im_start|>", END_OF_TURN]
# Qwen2.5-Instruct's chat template, verbatim (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct).
QWEN25_CHAT_TEMPLATE = package_files("brandcopy").joinpath("templates", "qwen2.5-instruct.jinja").read_text(encoding="utf-8")


def build_tiny_model(
    out_dir: str | Path,
    texts: list[str],
    *,
    vocab_size: int = 4096,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    pretrain: "PretrainSettings | None" = None,
) -> Path:
    """Train a Qwen2 tokenizer on `texts` and save it with a small Qwen2ForCausalLM, random or pre-trained.

    The tokenizer is a byte-level BPE with Qwen2's split regex and NFC normalization (what
    AutoTokenizer rebuilds as Qwen2Tokenizer, so ids survive a reload), the ChatML special tokens
    and Qwen2.5-Instruct's chat template. Special tokens are set as Qwen2.5-Instruct ships them:
    eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos.

    Args:
        out_dir: Folder to write; created if missing, replaced whole once the new model is saved.
        texts: Training text for the tokenizer (any language; unseen characters fall back to bytes).
        vocab_size: Upper bound on the vocabulary; small corpora give fewer tokens.
        hidden_size: Model width; bitsandbytes' CPU 4-bit kernels need at least 64.
        num_layers: Decoder layers.
        seed: Seed for the model's random weights.
        pretrain: When given, a short next-token pre-training pass on its texts (plain text, no chat
            markup, so the base learns the domain's language but not when a turn ends); its losses are
            saved in ``pretraining.json``. None leaves the weights random.

    Returns:
        The folder, loadable by AutoModelForCausalLM / AutoTokenizer with HF_HUB_OFFLINE=1.

    Raises:
        ValueError: If `texts` is empty.
    """
    if not texts:
        raise ValueError("build_tiny_model needs at least one text to train the tokenizer on.")
    out_dir = Path(out_dir)
    tokenizer = train_qwen2_tokenizer(texts, vocab_size=vocab_size)
    model = _tiny_qwen2(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    report = pretrain_tiny_model(model, tokenizer, pretrain) if pretrain else None
    with atomic_dir(out_dir) as partial:  # a build killed midway leaves no config.json without weights
        tokenizer.save_pretrained(partial)
        model.to(torch.bfloat16).save_pretrained(partial)
        weights_follow_umask(partial, partial / "config.json")
        if report:
            (partial / "pretraining.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return out_dir


@dataclass
class PretrainSettings:
    """A short causal-LM pre-training pass of the tiny model (all weights, AdamW, cosine decay).

    Attributes:
        texts: Plain training text, one document per item; documents are joined with
            ``<|endoftext|>`` and cut into blocks.
        steps: Optimizer steps.
        block_size: Tokens per training row.
        batch_size: Rows per step, drawn at random from the blocks.
        lr: Peak learning rate.
        seed: Seed for the row order.
    """

    texts: list[str]
    steps: int = 200
    block_size: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


def pretrain_tiny_model(model, tokenizer, settings: PretrainSettings) -> dict:
    """Train every weight of ``model`` on the next token of ``settings.texts`` (in place, float32).

    Returns:
        ``{"steps", "tokens", "blocks", "first_loss", "last_loss"}`` (losses are the mean of the first
        and last 10 steps).

    Raises:
        ValueError: The texts give fewer tokens than one block.
    """
    blocks = _pretraining_blocks(tokenizer, settings.texts, settings.block_size)
    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    for _ in range(settings.steps):
        rows = blocks[torch.randint(len(blocks), (settings.batch_size,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    window = min(10, len(losses))
    return {"steps": settings.steps, "tokens": blocks.numel(), "blocks": len(blocks),
            "first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window}


def _pretraining_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """The texts as one ``<|endoftext|>``-separated token stream, cut into rows of ``block_size``."""
    separator = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    stream = [i for text in texts for i in [*tokenizer(text, add_special_tokens=False)["input_ids"], separator]]
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"pre-training text gives {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size]).view(n, block_size)


def train_qwen2_tokenizer(texts: list[str], *, vocab_size: int = 4096) -> Qwen2Tokenizer:
    """Train a byte-level BPE exactly as Qwen2Tokenizer pre-tokenizes, with ChatML special tokens.

    Args:
        texts: Training text.
        vocab_size: Upper bound on the vocabulary size.

    Returns:
        A Qwen2Tokenizer with Qwen2.5-Instruct's special tokens and chat template.
    """
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        eos_token=END_OF_TURN,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
    )
    # Qwen2Tokenizer registers only eos/pad as added tokens; <|im_start|> must be one too, or the
    # template's markers would be split into bytes.
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def _tiny_qwen2(tokenizer: Qwen2Tokenizer, *, hidden_size: int, num_layers: int, seed: int) -> Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM whose config and generation config mirror Qwen2.5-7B-Instruct's."""
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, END_OF_TURN])
    config = Qwen2Config(
        vocab_size=_round_up(len(tokenizer), 64),  # Qwen pads its embedding rows past the tokenizer, too
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        # 5x the usual 0.02: a random model this narrow needs larger weights before LoRA alone (frozen
        # lm_head) can sharpen its logits; with 0.02 a LoRA SFT on it cannot move the loss.
        initializer_range=0.1,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    # Qwen2.5-Instruct's generation_config.json, minus its sampling defaults: callers choose those.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
