"""Calibration data for error-compensating rounding: text from files or from an lm-eval task, cut into
``nsamples`` windows of ``seqlen`` tokens, in an order drawn with a seeded generator.

The texts (a file's paragraphs, a task's documents) are put in the order of ``torch.randperm`` on a generator
seeded with ``seed``, tokenized in that order without special tokens and concatenated, EOS-separated (as
:func:`corpus.token_batches` does), until ``nsamples · seqlen`` tokens are there; those are cut into ``nsamples``
consecutive windows of exactly ``seqlen`` tokens (no padding, so no attention mask is needed). Only the texts
needed are read (a task's documents are rendered lazily: a large task costs what the windows need), and the
same texts, tokenizer and seed give the same windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class TaskTexts(Sequence[str]):
    """A task's documents as calibration texts, each rendered when it is read (lm-eval renders a document's
    template per call: rendering every document of a large task up front costs minutes)."""

    def __init__(self, parts: list[tuple[Any, Any]]) -> None:
        self.parts = parts  # (task, its evaluation documents)
        self.sizes = [len(docs) for _, docs in parts]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        for (task, docs), n in zip(self.parts, self.sizes):
            if i < n:
                return _doc_text(task, docs[i], getattr(task.config, "target_delimiter", " ") or "")
            i -= n
        raise IndexError(i)


def task_texts(task: str, include_path: str | Path | None = None) -> TaskTexts:
    """The texts of an lm-eval task's evaluation documents: each doc's ``doc_to_text`` + the task's target
    delimiter + its gold continuation (the correct choice of a multiple-choice task; for tasks whose
    ``doc_to_text`` picks the context, as winogrande's, that context + the target). The task is found among
    lm-eval-mx's offline tasks (``include_path``, default :func:`lm_eval_mx.hf.tasks.tasks_dir`) and lm-eval's."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from ..hf.tasks import tasks_dir

    path = str(include_path or tasks_dir())
    manager = TaskManager(include_path=path, include_defaults=False)
    if not manager.match_tasks([task]):
        manager = TaskManager(include_path=path)
    if not manager.match_tasks([task]):
        raise ValueError(f"--calibration: {task!r} is neither a file nor a task lm-eval knows")
    try:
        texts = TaskTexts([(t, t.eval_docs) for t in _leaves(get_task_dict([task], manager))])
    except Exception as e:  # the hub unreachable, local data missing, ...: whatever the task's loader raises
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--calibration: the documents of task {task!r} could not be loaded ({type(e).__name__}: "
                         f"{why}); use a task whose data is here (e.g. hellaswag_offline) or text files") from None
    if not len(texts):
        raise ValueError(f"--calibration: task {task!r} has no documents")
    return texts


def _leaves(tree: dict[Any, Any]) -> list[Any]:
    out = []
    for value in tree.values():
        out += _leaves(value) if isinstance(value, dict) else [value]
    return out


def _doc_text(task: Any, doc: Any, delim: str) -> str:
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(text, int):  # the doc picks its context among the choices (winogrande)
            text = choices[text]
        elif isinstance(target, int):
            target = choices[target]
    if isinstance(target, list):
        target = target[0] if target else ""
    text, target = ("" if text is None else str(text)), ("" if target is None else str(target))
    return text + delim + target if text and target else text or target


def read_texts(sources: Sequence[str]) -> tuple[Sequence[str], str]:
    """(texts, kind) of ``--calibration``: every item an existing file (``files``: paragraphs of UTF-8 text), or
    one task name (``task``)."""
    from .corpus import read_corpus

    if not sources:
        raise ValueError("--calibration: give text files or one lm-eval task name")
    if any(not str(s).strip() for s in sources):
        raise ValueError("--calibration: an empty name; give text files or one lm-eval task name")
    files = [s for s in sources if Path(s).exists()]
    if len(files) == len(sources):
        dirs = [s for s in files if Path(s).is_dir()]
        if dirs:
            raise ValueError(f"--calibration: {dirs[0]} is a directory; give text files (e.g. {dirs[0]}/*.txt)")
        try:
            return read_corpus(files), "files"
        except ValueError as e:
            raise ValueError(str(e).replace("--corpus", "--calibration")) from None
    if files:
        missing = [s for s in sources if s not in files]
        raise ValueError(f"--calibration: {missing[0]} is not a file (a task name cannot be mixed with files)")
    if len(sources) > 1:
        raise ValueError(f"--calibration: {sources[0]} is not a file; give files, or one task name "
                         f"(got {len(sources)} names)")
    return task_texts(sources[0]), "task"


def calibration_windows(tokenizer: Any, texts: Sequence[str], nsamples: int, seqlen: int, seed: int = 0
                        ) -> tuple[torch.Tensor, int]:
    """([nsamples, seqlen] token ids, texts read): the windows the module docstring defines.

    Too little text for ``nsamples`` windows of ``seqlen`` tokens is a ValueError naming the counts."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"--nsamples and --seqlen must be >= 1, got {nsamples} and {seqlen}")
    eos = tokenizer.eos_token_id
    need = nsamples * seqlen
    ids: list[int] = []
    read = 0
    for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist():
        text = texts[i]
        read += 1
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(
            f"the calibration text holds {len(ids)} tokens, {len(ids) // seqlen} windows of --seqlen {seqlen}, fewer "
            f"than --nsamples {nsamples}: give more text, or lower --nsamples or --seqlen")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(nsamples, seqlen), read
