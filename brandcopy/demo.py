"""The CPU demo behind ``make demo``: the whole model path on the tiny local model, in a minute.

Builds the tiny Qwen2 model from the repository's own text, loads it through ``load_model``,
fixes EOS/pad/template, runs a short assistant-only SFT, saves the adapter and generates a sample
that ends at the end-of-turn token. Later stages (data, DPO, GRPO, evaluation) join it as they land.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from brandcopy.generation import GenerationParams, generate_batch
from brandcopy.modeling import LoraSettings, build_tiny_model, check_training_example, fix_special_tokens, load_model

REPO = Path(__file__).resolve().parents[1]
CORPUS_GLOBS = ("*.md", "docs/*.md", "data/*.txt", "data/*.yaml", "data/brands/*/*.yaml", "data/brands/*/*.jsonl")


@dataclass
class DemoResult:
    """What the demo produced.

    Attributes:
        model_dir: The tiny base model.
        adapter_dir: The SFT adapter and its fixed tokenizer.
        prompt: The user turn the sample answers.
        sample: The generated completion, special tokens included.
        stopped: Whether generation ended with the end-of-turn token.
        losses: Training loss at each logged step.
    """

    model_dir: Path
    adapter_dir: Path
    prompt: str
    sample: str
    stopped: bool
    losses: list[float]


def repo_texts(root: Path = REPO) -> list[str]:
    """Non-empty lines of the repository's docs and data, the tiny tokenizer's training text."""
    files = sorted({path for pattern in CORPUS_GLOBS for path in root.glob(pattern)})
    return [line for path in files for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def demo_conversations(root: Path = REPO, count: int = 8) -> list[list[dict]]:
    """Instruction -> copy pairs from the first Chinese lines of data/tiny_corpus.txt."""
    lines = (root / "data" / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    copy = [line for line in lines if re.match(r"[\u4e00-\u9fff]", line)][:count]
    return [
        [{"role": "user", "content": f"写一句护肤文案，开头是“{text[:4]}”。"}, {"role": "assistant", "content": text}]
        for text in copy
    ]


def run_demo(out_dir: str | Path = "outputs/demo", *, steps: int = 80, backend: str = "auto") -> DemoResult:
    """Build, load, fix, train and sample the tiny model; see the module docstring.

    Args:
        out_dir: Run directory; gets ``tiny-model/`` and ``sft/`` (the adapter).
        steps: SFT optimizer steps on the 8 demo conversations.
        backend: Loading backend for `load_model`.

    Returns:
        Paths, the sample and the loss curve.
    """
    out_dir = Path(out_dir)
    model_dir = build_tiny_model(out_dir / "tiny-model", repo_texts())
    model, tokenizer = load_model(model_dir, backend=backend, lora=LoraSettings(r=16, alpha=32))
    fix_special_tokens(model, tokenizer)
    conversations = demo_conversations()
    print("Training example, trained spans in [[ ]]:\n" + str(check_training_example(tokenizer, {"messages": conversations[0]})))
    losses = _train(model, tokenizer, conversations, out_dir / "sft-checkpoints", steps)
    adapter_dir = out_dir / "sft"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    [generation] = generate_batch(model, tokenizer, [conversations[0][:1]], GenerationParams(max_new_tokens=64))
    sample = tokenizer.decode(generation.token_ids)
    return DemoResult(model_dir, adapter_dir, conversations[0][0]["content"], sample, generation.stopped, losses)


def _train(model, tokenizer, conversations: list[list[dict]], checkpoint_dir: Path, steps: int) -> list[float]:
    """A short assistant-only SFT run; returns the logged losses."""
    gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        max_steps=steps,
        per_device_train_batch_size=len(conversations),
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=10,
        assistant_only_loss=True,  # the loss the real SFT stage uses: assistant content + <|im_end|>
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"messages": conversation} for conversation in conversations])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]
