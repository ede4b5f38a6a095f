"""Command-line inputs every command shares: ``key=value`` lists, hf model args, MX configurations,
devices, run limits and task names, each checked before any model loads.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..numerics.formats import suggest
from ..selection.config import MX_KEYS, MXConfig, parse_mx_only


def parse_kv(text: str, what: str) -> dict[str, Any]:
    """lm-eval's ``key=value,...`` (values typed as lm-eval types them), refusing an item without '=' and a key
    given twice (lm-eval would keep the last value silently)."""
    from lm_eval.utils import simple_parse_args_string

    items = [a for a in text.split(",") if a.strip()]
    keys = [a.partition("=")[0].strip() for a in items]
    bad = [a for a, k in zip(items, keys) if "=" not in a or not k]
    if bad:
        raise ValueError(f"{what}: expected key=value, got {bad[0]!r}")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{what}: {', '.join(twice)} given twice in {text!r}")
    return simple_parse_args_string(text)


def parse_model_args(text: str, mx_flag: str) -> dict[str, Any]:
    """``--model_args``: the hf model's arguments, with ``pretrained`` and without MX keys (``mx_flag`` takes those)."""
    args = parse_kv(text, "--model_args")
    if "pretrained" not in args:
        raise ValueError("--model_args needs pretrained=<model path or hub id>")
    mx_keys = [k for k in args if k in MX_KEYS]
    if mx_keys:
        raise ValueError(f"put MX keys ({', '.join(mx_keys)}) in {mx_flag}, not --model_args")
    return args


def parse_config(source: str, spec: dict[str, Any]) -> MXConfig:
    """One MX configuration from MX keys only; errors name ``source``, e.g. ``--config 'format=fp8'``.
    An empty one is refused (it would run the defaults without anyone asking for them)."""
    if not spec:
        raise ValueError(f"{source} is empty: give MX keys, e.g. format=fp4,mlp_only=True ({', '.join(MX_KEYS)})")
    return parse_mx_only(spec, source)


def check_run_args(limit: float | None, batch_size: int | str, num_fewshot: int | None = None) -> tuple[float | None, int | str]:
    """(limit, batch_size) as lm-eval takes them, refusing values it would only trip over once the model is loaded."""
    if limit is not None:
        if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
            raise ValueError(f"--limit must be an integer >= 1 (examples per task) or a fraction in (0, 1), got {limit:g}")
        limit = int(limit) if limit >= 1 else limit
    text = str(batch_size)
    if text.isdigit() and int(text) >= 1:
        batch: int | str = int(text)
    elif re.fullmatch(r"auto(:[1-9][0-9]*)?", text):
        batch = text
    else:
        raise ValueError(f"--batch_size must be an integer >= 1, auto or auto:N, got {text!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    return limit, batch


def resolve_device(device: str | None, model_args: dict[str, Any] | None = None) -> str:
    """``--device``, else model_args' ``device``, else cuda when available, else cpu.

    lm-eval's HFLM defaults to "cuda" and falls back to the CPU only for a device it does not know,
    so without this a CPU-only machine fails deep in transformers ("Torch not compiled with CUDA enabled").
    """
    import torch

    given = (model_args or {}).get("device")
    if device is not None and given is not None and str(given) != device:
        raise ValueError(f"device given twice: --device {device} and model_args device={given}")
    chosen = device if device is not None else given
    if chosen is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(str(chosen)).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {chosen!r} is not a device: give cpu, cuda or cuda:N (or leave --device out)")
    if str(chosen).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {chosen}: CUDA is not available here; use cpu, or leave --device out")
    return str(chosen)


def task_manager_for(tasks: list[str], include_path: list[str]) -> Any:
    """lm-eval's TaskManager over ``include_path`` alone when it holds every task (the offline tasks: instant),
    else with lm-eval's own tasks too (indexing their ~13,000 YAML files takes 15 s or more on 2 cores)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(Path(t).is_file() or local.match_tasks([t]) for t in tasks):
        return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], task_manager: Any, flag: str = "--tasks") -> None:
    """Refuse, before the model loads, task names that lm-eval does not know (``flag``: the option that gave them)."""
    if not tasks:
        raise ValueError(f"{flag}: no task given")
    unknown = [t for t in tasks if not Path(t).is_file() and not task_manager.match_tasks([t])]
    if unknown:
        hints = "; ".join(f"{t!r}{suggest(t, task_manager.all_tasks)}" for t in unknown)
        raise ValueError(f"{flag}: unknown task {hints} (`lm-eval-mx ls tasks` lists them)")


def error_line(e: BaseException) -> str:
    """``TypeName: first line of its message``: another library's (often multi-line) error as one line of a refusal."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """A directory a command writes its results to (made when missing), checked before any work: it, or the first
    existing directory above it, must be a directory that takes new entries; so no result is lost after a long
    evaluation. Returns it as an absolute path."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: give a directory")
    out = Path(os.path.abspath(path))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so no directory can be made under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lm-eval-mx-check.", dir=base))
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {base} ({e.strerror or e})") from None
    return out
