"""SFT token efficiency: packed padding-free batches vs naive padding, on the shipped golden copy.

Builds the tiny model in a temporary folder, renders every golden sample as the SFT stage sees it
(``prompts.chat_messages``: system prompt, instruction with product facts, the copy), and runs
the SFT stage's own trainer (``train.sft.sft_trainer``) twice: ``sft_packing: true`` (TRL's
best-fit-decreasing packing, padding-free) and ``sft_packing: false`` (each batch padded to its
longest example). For each it counts real (non-pad) tokens over every batch of an epoch, then
times a few optimizer steps. Goal: packed batches >= 95% real tokens.

Usage: python bench/token_efficiency.py [--max-seq-length 2048] [--batch-size 8] [--steps 4]
The last line printed is one JSON object.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from brandcopy.brand import load_brand, load_golden  # noqa: E402
from brandcopy.config import SFTStageConfig, load_stage_config  # noqa: E402
from brandcopy.demo import repo_texts  # noqa: E402
from brandcopy.modeling import fix_special_tokens, load_model  # noqa: E402
from brandcopy.tiny import build_tiny_model  # noqa: E402
from brandcopy.prompts import chat_messages  # noqa: E402
from brandcopy.train.common import load_split, lora_settings  # noqa: E402
from brandcopy.train.sft import sft_trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_golden_sft(data_dir: Path) -> int:
    """Write every golden sample as an SFT row (``messages``) to ``sft_train.jsonl``; return the count."""
    brand = load_brand("yuansu")
    rows = [{"messages": chat_messages(brand, r["product_id"], r["content_type"], r["text"])} for r in load_golden(brand)]
    data_dir.mkdir(parents=True)
    (data_dir / "sft_train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    return len(rows)


def batch_counts(trainer, pad_id: int) -> tuple[int, int, int]:
    """(real tokens, token slots, batches) over one epoch of the trainer's own dataloader."""
    real = slots = batches = 0
    for batch in trainer.get_train_dataloader():
        ids = batch["input_ids"]
        mask = batch["attention_mask"] if "attention_mask" in batch else ids != pad_id
        real, slots, batches = real + int(mask.sum()), slots + ids.numel(), batches + 1
    return real, slots, batches


def measure(cfg: SFTStageConfig) -> dict:
    """Token counts over an epoch and the time of ``sft_max_steps`` optimizer steps for one setting."""
    model, tokenizer = load_model(cfg.model, backend="hf", max_seq_length=cfg.max_seq_length, lora=lora_settings(cfg),
                                  gradient_checkpointing=False)
    fix_special_tokens(model, tokenizer)
    cfg.out_dir.mkdir(parents=True)
    trainer = sft_trainer(cfg, model, tokenizer, load_split(cfg.data_path, "sft", "train"))
    real, slots, batches = batch_counts(trainer, tokenizer.pad_token_id)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    steps = result.global_step
    return {"real_token_share": real / slots, "real_tokens_per_batch": real / batches, "batches_per_epoch": batches,
            "step_time_s": seconds / steps, "real_tokens_per_s": real / batches * steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps timed per setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny-model", repo_texts())
        samples = write_golden_sft(tmp / "data")
        common = [f"model={model_dir}", f"output_root={tmp}", f"data_dir={tmp / 'data'}", "backend=hf",
                  f"max_seq_length={args.max_seq_length}", f"sft_max_steps={args.steps}", "sft_eval=false",
                  "sft_gradient_accumulation_steps=1", "gradient_checkpointing=false"]
        preset = REPO / "configs" / "tiny-cpu.yaml"
        # A packed row holds max_seq_length tokens; give it about as many real tokens per step as the padded batch.
        packed = load_stage_config(SFTStageConfig, preset, common + ["run=packed", "sft_packing=true",
                                                                     "sft_per_device_train_batch_size=2"])
        padded = load_stage_config(SFTStageConfig, preset, common + ["run=padded", "sft_packing=false",
                                                                     f"sft_per_device_train_batch_size={args.batch_size}"])
        results = {"packed": measure(packed), "padded": measure(padded)}
    for name, r in results.items():
        print(f"{name:7s} real tokens {r['real_token_share']:.1%} of {r['batches_per_epoch']} batches, "
              f"{r['step_time_s']:.2f} s/step, {r['real_tokens_per_s']:.0f} real tokens/s")
    summary = {
        "samples": samples,
        "max_seq_length": args.max_seq_length,
        "packed_real_token_share": round(results["packed"]["real_token_share"], 4),
        "padded_real_token_share": round(results["padded"]["real_token_share"], 4),
        "packed_step_time_s": round(results["packed"]["step_time_s"], 3),
        "padded_step_time_s": round(results["padded"]["step_time_s"], 3),
        "packed_real_tokens_per_s": round(results["packed"]["real_tokens_per_s"]),
        "padded_real_tokens_per_s": round(results["padded"]["real_tokens_per_s"]),
        "goal_met": results["packed"]["real_token_share"] >= 0.95,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
