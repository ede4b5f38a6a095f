"""Every command in the ```bash blocks of README.md, of its pages docs/*.md (not the drafts in docs/_new/) and of
BENCHMARKS.md runs as pasted in a POSIX shell; every relative link between them resolves.

Each command (``\\`` continuations joined, comments dropped) is scanned as the shell scans it: no unquoted
``| ; & < >`` (a pipe or redirection the author did not mean), no unquoted backslash (the shell eats it:
``include=layers\\.0`` reaches lm-eval as ``layers.0``) and no unquoted glob character (``[0-9]`` may match a
file). Then the words the shell would pass are parsed as the program parses them: ``--model_args`` through
lm-eval's ``simple_parse_args_string`` and hf-mx's ``parse_mx_args``, ``lm-eval-mx`` subcommands through its
own argparse parser and the commands' argument checks. Placeholders stay placeholders: ``PATH`` as a model,
``$(...)`` as a path, ``...`` for omitted arguments.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The README and its topic pages (docs/_new/ holds drafts, not pages).
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LM_EVAL = {"lm_eval", "lm-eval"}
# Intended pipelines or redirections, written out in full; none in the README today.
ALLOWED_OPERATORS: set[str] = set()


def bash_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command of every ```bash block."""
    out: list[tuple[int, str]] = []
    block = False
    pending, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    assert not pending, f"README line {start}: a continuation '\\' ends its block"
    return out


def unquoted(cmd: str) -> list[tuple[int, str]]:
    """(position, character) of every character the shell reads outside quotes, comments dropped."""
    out: list[tuple[int, str]] = []
    quote = None
    depth = 0  # inside $( ... ): its own command, checked as written
    i = 0
    while i < len(cmd):
        c = cmd[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif quote == '"':
            if c == "\\" and i + 1 < len(cmd):
                i += 1
            elif c == '"':
                quote = None
        elif c in "'\"":
            quote = c
        elif cmd.startswith("$(", i):
            depth += 1
            i += 1
        elif depth and c == ")":
            depth -= 1
        elif c == "#" and (i == 0 or cmd[i - 1].isspace()):
            break
        elif not depth:
            out.append((i, c))
        i += 1
    assert quote is None, f"unterminated {quote} quote in {cmd!r}"
    return out


def shell_problems(cmd: str) -> list[str]:
    problems = []
    chars = unquoted(cmd)
    ops = "".join(c if c in "|;&<>" else " " for _, c in chars).split()
    if ops and cmd not in ALLOWED_OPERATORS:
        problems.append(f"unquoted shell operator(s) {ops}: quote the argument that holds them")
    if any(c == "\\" for _, c in chars):
        problems.append("unquoted backslash: the shell removes it; quote the argument ('...')")
    globs = sorted({c for _, c in chars if c in "*?["})
    if globs:
        problems.append(f"unquoted glob character(s) {globs}: the shell may expand them; quote the argument")
    return problems


def substitute(cmd: str) -> str:
    """``$(...)`` (balanced) -> PATH, as the shell would put one word there."""
    while "$(" in cmd:
        i = cmd.index("$(")
        depth, j = 0, i + 1
        for j in range(i + 1, len(cmd)):
            depth += {"(": 1, ")": -1}.get(cmd[j], 0)
            if depth == 0:
                break
        cmd = cmd[:i] + "PATH" + cmd[j + 1:]
    return cmd


def words(cmd: str) -> list[str]:
    return [w for w in shlex.split(substitute(cmd), comments=True) if w != "..."]


def flag_values(argv: list[str], flag: str) -> list[str]:
    vals = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return vals + [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]


@pytest.fixture()
def recipe_file(tmp_path, monkeypatch):
    """README commands name ``recipe.json``: a real recipe there, in a working directory of its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps({"model_args": {"layer_formats": r"^model\.layers\.0\.:fp4_e2m1"}}))


def check_model_args(text: str) -> None:
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_mx.selection.config import parse_mx_args

    args = simple_parse_args_string(text)
    assert args.get("pretrained"), f"--model_args {text!r}: no pretrained="
    parse_mx_args(args)


def check_lm_eval_mx(argv: list[str]) -> None:
    """``lm-eval-mx ARGS``: its own subcommands through its parser and argument checks, the rest as lm-eval's."""
    from lm_eval_mx.commands.args import parse_config, parse_kv, parse_model_args
    from lm_eval_mx.commands.cli import build_parser
    from lm_eval_mx.commands.compare import expand_sweep

    if not argv or argv[0] not in ("compare", "divergence", "search"):
        for text in flag_values(argv, "--model_args"):
            check_model_args(text)
        return
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"lm-eval-mx's parser refuses {argv}") from e
    if getattr(ns, "model_args", None):
        parse_model_args(ns.model_args, "--config")
    configs = ns.config if isinstance(ns.config, list) else [ns.config] if ns.config else []
    for text in configs:
        spec = parse_kv(text, "--config")
        if argv[0] == "search":  # the search chooses the formats; --config holds the other MX keys
            spec.setdefault("format", "fp8_e4m3")
        parse_config(f"--config {text!r}", spec)
    if getattr(ns, "sweep", None):
        assert expand_sweep(ns.sweep)


def check_command(argv: list[str]) -> str:
    """Parse one command's arguments as its program would; returns what was checked."""
    if argv[0] == "accelerate" and "-m" in argv:
        argv = ["python", *argv[argv.index("-m"):]]
    if argv[:3] == ["python", "-m", "lm_eval"] or argv[0] in LM_EVAL:
        texts = flag_values(argv, "--model_args")
        assert texts, f"{argv}: no --model_args"
        for text in texts:
            check_model_args(text)
        return "lm_eval"
    if argv[0] == "lm-eval-mx":
        check_lm_eval_mx(argv[1:])
        return "lm-eval-mx"
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(argv[1:]) <= set(targets), f"{argv}: not a Makefile target ({targets})"
        return "make"
    if argv[0] in ("python", "bash") and len(argv) > 1:
        if argv[1] == "-m":
            assert importlib.util.find_spec(argv[2]) is not None, f"{argv}: no module {argv[2]}"
        elif argv[1] == "-c":  # valid Python whose imports exist
            for node in ast.walk(ast.parse(argv[2])):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                for name in names:
                    assert importlib.util.find_spec(name) is not None, f"{argv}: no module {name}"
        else:
            assert (ROOT / argv[1]).is_file(), f"{argv}: no file {argv[1]}"
        return argv[0]
    return "other"


COMMANDS = [(page.relative_to(ROOT).as_posix(), line, cmd) for page in PAGES
            for line, cmd in bash_commands(page.read_text(encoding="utf-8"))]
BENCHMARK_COMMANDS = bash_commands((ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"))


def test_readme_has_commands():
    programs = {words(c)[0] for _, _, c in COMMANDS}
    assert {"lm_eval", "lm-eval", "lm-eval-mx", "python", "make"} <= programs, programs
    assert len(BENCHMARK_COMMANDS) >= 5


@pytest.mark.parametrize("page,line,cmd", COMMANDS, ids=[f"{p}:L{n}" for p, n, _ in COMMANDS])
def test_readme_command_runs_as_pasted(page, line, cmd, recipe_file):
    problems = shell_problems(cmd)
    assert not problems, f"{page} line {line}: {cmd}\n" + "\n".join(problems)
    check_command(words(cmd))


@pytest.mark.parametrize("line,cmd", BENCHMARK_COMMANDS, ids=[f"L{n}" for n, _ in BENCHMARK_COMMANDS])
def test_benchmarks_command_runs_as_pasted(line, cmd, recipe_file):
    problems = shell_problems(cmd)
    assert not problems, f"BENCHMARKS.md line {line}: {cmd}\n" + "\n".join(problems)
    check_command(words(cmd))


def test_checker_catches_shell_mistakes():
    """The checks above fail on the mistakes they exist for (the README once had the first two)."""
    assert shell_problems("lm_eval --model_args pretrained=P,roles=attn|mlp_down --tasks piqa")
    assert shell_problems(r"lm_eval --model_args pretrained=P,include=layers\.[0-9]\.mlp --tasks t")
    assert shell_problems("lm_eval --model_args pretrained=P,include=layers.[0-9].mlp --tasks t")
    assert not shell_problems(r"lm_eval --model_args 'pretrained=P,include=layers\.[0-9]\.mlp,roles=attn|mlp' --tasks t")
    assert not shell_problems('lm-eval-mx compare --model_args pretrained=$(python -c "import a; print(a.b())"),x=1')
    assert words(r"x --model_args 'pretrained=P,include=layers\.0'") == ["x", "--model_args",
                                                                          r"pretrained=P,include=layers\.0"]
    assert words(r"x pretrained=P,include=layers\.0") == ["x", "pretrained=P,include=layers.0"]


def test_checker_catches_bad_arguments(recipe_file):
    with pytest.raises(ValueError, match="fp9"):
        check_command(words("lm_eval --model hf-mx --model_args pretrained=P,format=fp9 --tasks t"))
    with pytest.raises(ValueError, match="atn"):  # a role that does not exist
        check_command(words("lm_eval --model hf-mx --model_args pretrained=P,roles=atn --tasks t"))
    with pytest.raises(AssertionError, match="parser refuses"):
        check_command(words("lm-eval-mx compare --model_args pretrained=P --confg format=fp8"))
    with pytest.raises(ValueError, match="MX keys"):
        check_command(words("lm-eval-mx divergence --model_args pretrained=P,format=fp8 --config format=fp4"))
    with pytest.raises(AssertionError, match="Makefile"):
        check_command(words("make tests"))
    assert check_command(words("lm_eval --model hf-mx --model_args pretrained=P,recipe=recipe.json --tasks t"))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation but '-' dropped, spaces to '-'."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def links(path: Path) -> list[tuple[str, str]]:
    """(target file or '', anchor or '') of every relative Markdown link outside code."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            file, _, anchor = target.partition("#")
            out.append((file, anchor))
    return out


@pytest.mark.parametrize("page", [*PAGES, ROOT / "BENCHMARKS.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    """The README was split into docs/ pages: every link between them (file and heading) still points somewhere."""
    found = links(page)
    for file, anchor in found:
        target = (page.parent / file).resolve() if file else page
        assert target.exists(), f"{page.name}: link to {file!r}, no such file"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: link to {file}#{anchor}, no such heading"
    if page == README:
        pages = {(README.parent / f).resolve() for f, _ in found if f}
        assert set(PAGES[1:]) <= pages, "a docs/ page the README does not link"
