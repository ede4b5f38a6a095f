"""Where lm-eval-mx's offline task YAMLs (and the text corpus) live: in the installed package, or ``tasks/``
of a source checkout."""

from __future__ import annotations

from pathlib import Path


def tasks_dir() -> Path:
    """The offline task YAMLs: inside the installed package, or ``tasks/`` of a source checkout."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "tasks", here.parent / "tasks"):
        if (candidate / "utils.py").exists():
            return candidate
    raise FileNotFoundError("lm-eval-mx's tasks/ directory is missing from this installation")
