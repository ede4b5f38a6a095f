"""Text for measurements: UTF-8 corpus files read as paragraphs, and token batches cut from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


def token_batches(tokenizer: Any, texts: Iterable[str], max_length: int, batch_size: int,
                  max_tokens: int | None = None) -> list[torch.Tensor]:
    """Concatenate the texts (EOS-separated) and cut them into [batch, max_length] id tensors."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if max_tokens and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens else ids
    seqs = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    seqs = [s for s in seqs if len(s) > 1]
    batches = []
    for i in range(0, len(seqs), batch_size):
        group = seqs[i : i + batch_size]
        width = max(len(s) for s in group)
        pad = eos if eos is not None else 0
        t = torch.full((len(group), width), pad, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in group])
        for r, s in enumerate(group):
            t[r, : len(s)] = torch.tensor(s)
        batches.append(torch.cat([lengths[:, None], t], 1))  # column 0 holds the length
    return batches


def read_corpus(files: Sequence[str | Path] | None) -> list[str]:
    """Paragraphs (blank-line separated) of UTF-8 text files (None: the shipped corpus, tasks/corpus/*.txt);
    a one-line error naming a bad file."""
    if files is None:
        from ..hf.tasks import tasks_dir

        files = sorted((tasks_dir() / "corpus").glob("*.txt"))
    if not files:
        raise ValueError("--corpus: no text file given")
    files = [Path(f) for f in files]
    texts: list[str] = []
    for f in files:
        try:
            paragraphs = [t for t in f.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        except OSError as e:
            raise ValueError(f"--corpus: cannot read {f}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--corpus: {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not paragraphs:
            raise ValueError(f"--corpus: {f} holds no text")
        texts += paragraphs
    return texts
