"""``lmdistill eval``: a saved model on a corpus split, through the same data path as training."""

from __future__ import annotations

from lmdistill.data.prepare import prepare_data
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.errors import ConfigError
from lmdistill.eval.lm import evaluate_lm
from lmdistill.models.loading import load_causal_lm
from lmdistill.teachers.live import load_live_teacher


def evaluate_model(
    model_path: str,
    *,
    corpus: str = "kjv",
    split: str = "validation",
    block_size: int = 128,
    teacher: str | None = None,
    max_batches: int | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(corpus, block_size=block_size, tokenizer=tokenizer)
    if split not in data.streams:
        raise ConfigError(f"unknown split '{split}'; allowed: {', '.join(data.streams)}")
    model = load_causal_lm(model_path)
    live = None
    vocab = len(tokenizer)
    if teacher is not None:
        live = load_live_teacher(teacher, tokenizer=load_tokenizer(teacher), student_tokenizer=tokenizer,
                                 student_rows=model.get_output_embeddings().weight.shape[0])
        vocab = live.alignment.real_vocab_size
    stream = data.streams[split]
    metrics = evaluate_lm(
        model, data.blocks(split), bytes_per_token=stream.bytes_per_target,
        batch_size=batch_size, max_batches=max_batches, teacher=live, vocab_size=vocab,
    )
    return {"model": model_path, "corpus": corpus, "split": split, **metrics}
