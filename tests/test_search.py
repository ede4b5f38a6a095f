"""lm-eval-mx search: the solver against brute force, the searched mix against naive mixes, recipes in hf-mx."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_eval_mx.algorithms.corpus import token_batches
from lm_eval_mx.algorithms.divergence import _logprobs, kl_sum
from lm_eval_mx.algorithms.search import solver, units
from lm_eval_mx.algorithms.search.measure import Measurer
from lm_eval_mx.algorithms.search.solver import mix_bits, solve
from lm_eval_mx.algorithms.search.units import SearchError, Unit, candidate_configs, parse_candidates, search_config
from lm_eval_mx.commands import search
from lm_eval_mx.commands.cli import main as cli_main
from lm_eval_mx.hf.tasks import tasks_dir

ROOT = Path(__file__).resolve().parent.parent
FP4, FP8 = "fp4_e2m1", "fp8_e4m3"


# ---------------------------------------------------------------------------------------------- inputs


def test_candidates_config_and_budget_are_checked():
    assert parse_candidates("fp4,mxfp8,bf16") == (FP4, FP8, "bf16")
    assert parse_candidates("nvfp4|none|fp6_e2m3") == ("nvfp4", "bf16", "fp6_e2m3")
    with pytest.raises(SearchError, match="names fp8_e4m3 twice"):
        parse_candidates("fp8,mxfp8")
    with pytest.raises(SearchError, match="--candidates: unknown MX element format 'fp5'; valid formats"):
        parse_candidates("fp5,fp8")
    with pytest.raises(SearchError, match="at least two formats"):
        parse_candidates("fp4")
    with pytest.raises(SearchError, match="at least two formats, one of them MX"):
        parse_candidates(["bf16"])
    with pytest.raises(SearchError, match="--config: roles: unknown role 'mpl'"):
        search_config({"roles": "mpl"})
    with pytest.raises(SearchError, match="--config w_format: the search decides"):
        search_config({"w_format": "fp4"})
    with pytest.raises(SearchError, match=r"--config recipe:.*--from"):
        search_config({"recipe": "r.json"})
    with pytest.raises(SearchError, match="roles=none"):
        search_config({"roles": "none"})
    with pytest.raises(SearchError, match=r"MX keys only.*got pretrained"):
        search_config({"pretrained": "x"})
    cfg = search_config({"roles": "mlp", "weight_only": True, "block_size": 16})
    assert cfg.weight_only and cfg.block_size == 16
    with pytest.raises(SearchError, match=r"--candidates nvfp4 .*nvfp4 fixes block_size=16 but block_size=32"):
        candidate_configs(search_config({"block_size": 32}), ["nvfp4", FP8])
    # scale_mode/scale_bits shape the MX candidates' E8M0 scales; nvfp4 (E4M3 scales) is measured without them
    ceil = search_config({"scale_mode": "ceil", "scale_bits": 6})
    configs = candidate_configs(ceil, ["nvfp4", FP8, "bf16"])
    assert (configs["nvfp4"].scale_mode, configs["nvfp4"].scale_bits) == (None, None)
    assert (configs[FP8].scale_mode, configs[FP8].scale_bits) == ("ceil", 6)
    with pytest.raises(SearchError, match=r"--config scale_mode, scale_bits shapes E8M0 .* no candidate \(nvfp4\)"):
        candidate_configs(ceil, ["nvfp4", "bf16"])
    from lm_eval_mx.algorithms.search.recipe import recipe_model_args
    from lm_eval_mx.selection.config import parse_mx_args

    us = [Unit("a", ("a",), 64, {}), Unit("b", ("b",), 64, {})]
    args = {"scale_mode": "ceil", "scale_bits": 6}
    mixed = recipe_model_args(args, us, {"a": "nvfp4", "b": FP8})
    assert mixed["scale_mode"] == "ceil" and parse_mx_args(mixed)[0].scale_bits == 6
    only_nv = recipe_model_args(args, us, {"a": "nvfp4", "b": "bf16"})
    assert "scale_mode" not in only_nv and "scale_bits" not in only_nv
    for bits, max_kl, match in ((None, None, "give a budget"), (0.0, None, "--bits must be a positive number"),
                                (math.nan, None, "--bits must be a positive number"), (None, -1.0, "--max_kl must be")):
        with pytest.raises(SearchError, match=match):
            solver.check_budget(bits, max_kl)


def test_bad_inputs_fail_before_the_model_loads(tmp_path, monkeypatch):
    """A path that does not exist as the model: these errors come first. lm-eval's own task index is left out
    (indexing its ~13,000 YAML files made this test take 15 s): an unknown --validate task is refused the same
    way against the offline tasks alone."""
    import lm_eval.tasks

    local = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local)
    latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    empty.write_text("\n\n  \n")
    args = ["search", "--model_args", "pretrained=/no/such/model", "--device", "cpu", "--output",
            str(tmp_path / "r.json")]
    cases = [
        (["--candidates", "fp4,fp8", "--bits", "4"], "--bits 4 is below the cheapest candidate, fp4_e2m1 at 4.25 bits"),
        (["--candidates", "fp4,fp8"], "give a budget"),
        (["--bits", "6"], "--candidates is required"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--config", "format=fp4"], "--config format: the search decides"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--limit", "3"], "--limit limits the --validate"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--validate", "mx_corpus_ppl,no_such_task"],
         "--validate: unknown task.*no_such_task"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--validate", "no_such_task"], "unknown task.*no_such_task"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--validate", "mx_corpus_ppl", "--limit", "1.5"],
         "--limit must be an integer >= 1"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--validate", "mx_corpus_ppl", "--limit", "0"],
         "--limit must be an integer >= 1"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--config", "roles=mlp,roles=all"], "--config: roles given twice"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--max_tokens", "1"], "--max_tokens must be >= 2, got 1"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--max_length", "0"], "--max_length must be >= 2"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--config", "roles"], "--config: expected key=value"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--config", ""], "--config is empty: give MX keys"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--corpus", str(tmp_path / "missing.txt")],
         "--corpus: cannot read .*missing.txt"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--corpus", str(latin1)], "--corpus: .*latin1.txt is not UTF-8"),
        (["--candidates", "fp4,fp8", "--bits", "6", "--corpus", str(empty)], "--corpus: .*empty.txt holds no text"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match):
            cli_main(args + extra)
    with pytest.raises(SystemExit, match="device given twice: --device cpu and model_args device=meta"):
        cli_main(["search", "--model_args", "pretrained=/no/such/model,device=meta", "--device", "cpu", "--candidates",
                  "fp4,fp8", "--bits", "6", "--output", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"MX keys .*w_format.* in --config"):
        cli_main(["search", "--model_args", "pretrained=/x,w_format=fp4", "--candidates", "fp4,fp8", "--bits", "6"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="device cuda: CUDA is not available here"):
            cli_main(["search", "--model_args", "pretrained=/x", "--device", "cuda", "--candidates", "fp4,fp8",
                      "--bits", "6"])


# ---------------------------------------------------------------------------------------------- solver


def brute_force(units: list[Unit], candidates: tuple[str, ...], sens: dict[str, dict[str, float]],
                bits: Fraction | float) -> tuple[float, Fraction]:
    """(least predicted KL, its average bits) over all candidates**units assignments within ``bits``."""
    scale = math.lcm(*(u.bits[f].denominator for u in units for f in candidates))
    params = sum(u.params for u in units)
    combos = np.array(list(itertools.product(range(len(candidates)), repeat=len(units))))
    cost = np.array([[int(u.bits[f] * scale) for f in candidates] for u in units])
    kl = np.nan_to_num(np.array([[sens[u.name][f] for f in candidates] for u in units]), nan=np.inf)
    rows = np.arange(len(units))
    total_bits, total_kl = cost[rows, combos].sum(1), kl[rows, combos].sum(1)
    ok = total_bits <= Fraction(str(bits)) * params * scale
    best = np.flatnonzero(ok)[np.argmin(total_kl[ok])]
    return float(total_kl[best]), Fraction(int(total_bits[best]), params * scale)


def _units(params: list[int], candidates: tuple[str, ...], rows: list[int] | None = None) -> list[Unit]:
    config = search_config({} if rows is None else {"block_size": 0})
    out = []
    for i, p in enumerate(params):
        row = None if rows is None else rows[i]
        out.append(Unit(f"u{i}", (f"u{i}",), p, {f: p * units.format_bits(config, f, row) for f in candidates}))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_solver_equals_brute_force_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    candidates = (FP4, "fp6_e2m3", FP8, "bf16")
    units = _units([int(p) * 32 for p in rng.integers(1, 200, 7)], candidates)
    sens = {u.name: dict(zip(candidates, sorted(rng.exponential(1.0, 4), reverse=True))) for u in units}
    sens["u3"]["fp6_e2m3"] = sens["u3"][FP4] + 1  # not monotone: a higher format may cost more KL
    sens["u5"][FP8] = math.nan  # a NaN KL is never chosen
    lo = float(mix_bits(units, dict.fromkeys(sens, FP4)))
    for bits in [*np.linspace(lo, 16.0, 9), mix_bits(units, {u: candidates[i % 4] for i, u in enumerate(sens)})]:
        bits = bits if isinstance(bits, Fraction) else round(float(bits), 4)  # exact mixes and decimals
        sol = solve(units, candidates, sens, bits=bits)
        best_kl, _ = brute_force(units, candidates, sens, bits)
        assert sol.predicted_kl == pytest.approx(best_kl, rel=1e-12, abs=1e-15)
        assert mix_bits(units, sol.assignment) <= Fraction(str(bits)) and sol.avg_bits == float(mix_bits(units, sol.assignment))
        assert sol.predicted_kl == pytest.approx(sum(sens[u][f] for u, f in sol.assignment.items()), rel=1e-12)
        assert sol.assignment["u5"] != FP8
        # --max_kl: the fewest bits whose predicted KL stays within the optimum just found
        cheapest = solve(units, candidates, sens, max_kl=sol.predicted_kl)
        kls = [sum(sens[u][f] for u, f in zip(sens, c)) for c in itertools.product(candidates, repeat=len(units))]
        brute = min(mix_bits(units, dict(zip(sens, c))) for c, kl in
                    zip(itertools.product(candidates, repeat=len(units)), kls) if kl <= sol.predicted_kl)
        assert cheapest.avg_bits == float(brute) and cheapest.avg_bits <= sol.avg_bits


def test_solver_bits_are_exact_with_whole_row_blocks():
    """block_size=0: scale bits are 8/row, fractions with odd denominators; totals stay exact."""
    candidates = (FP4, FP8)
    units = _units([576 * 3, 576 * 5, 1536 * 2], candidates, rows=[576, 576, 1536])
    assert units[0].bits[FP4] == Fraction(576 * 3 * 4 + 3 * 8)
    sens = {"u0": {FP4: 3.0, FP8: 0.0}, "u1": {FP4: 2.0, FP8: 0.0}, "u2": {FP4: 1.0, FP8: 0.0}}
    exact = mix_bits(units, {"u0": FP8, "u1": FP4, "u2": FP4})
    assert (exact * 10**15).denominator > 1  # no decimal writes it exactly
    assert solve(units, candidates, sens, bits=exact).assignment == {"u0": FP8, "u1": FP4, "u2": FP4}
    below = solve(units, candidates, sens, bits=exact - Fraction(1, 10**9))
    assert below.assignment == dict.fromkeys(sens, FP4)


def test_budget_errors_name_the_numbers():
    candidates = (FP4, FP8)
    units = _units([64, 64], candidates)
    sens = {"u0": {FP4: 0.5, FP8: 0.125}, "u1": {FP4: 0.25, FP8: 0.0625}}  # exact binary fractions
    with pytest.raises(SearchError, match=r"--bits 4.2 is below the cheapest mix, 4.2500 bits"):
        solve(units, candidates, sens, bits=4.2)
    with pytest.raises(SearchError, match=r"--max_kl 0.1 is below the lowest predicted KL of any mix, 0.1875.*add bf16"):
        solve(units, candidates, sens, max_kl=0.1)
    with pytest.raises(SearchError, match=r"refused: the cheapest mix with predicted KL <= 0.375 averages 6.2500 bits"
                                          r".*above --bits 5; within 5 bits the least predicted KL is 0.75"):
        solve(units, candidates, sens, bits=5, max_kl=0.375)
    both = solve(units, candidates, sens, bits=7, max_kl=0.375)
    assert both.assignment == {"u0": FP8, "u1": FP4} and both.avg_bits == 6.25
    assert solve(units, candidates, sens, bits=100).assignment == {"u0": FP8, "u1": FP8}


# ---------------------------------------------------------------------------------------------- on a model


def _corpus() -> list[str]:
    return [t for p in sorted((tasks_dir() / "corpus").glob("*.txt")) for t in p.read_text().split("\n\n") if t.strip()]


@functools.cache
def _tokenizer():
    from lm_eval_mx.hf.testing import build_tokenizer

    return build_tokenizer()


def _tiny(layers: int, seed: int = 0, std: float = 0.1):
    """A tiny random Llama; std 0.1 keeps MX perturbations small enough to add up (std 0.2 is chaotic)."""
    import transformers as tf

    from lm_eval_mx.hf.testing import randomize_

    tok = _tokenizer()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_(model, std, seed).eval(), tok


@pytest.fixture(scope="module")
def six_blocks():
    """A 6-block tiny Llama measured per block with fp4/fp8: (measurer, sensitivities)."""
    model, tok = _tiny(6)
    batches = token_batches(tok, _corpus(), 64, 8, 512)
    m = Measurer(model, search_config({}), (FP4, FP8), "block", batches, "cpu")
    return m, m.sensitivities(progress=False)


def test_measured_sensitivities_solve_like_brute_force(six_blocks):
    m, sens = six_blocks
    assert [u.name for u in m.units] == [f"model.layers.{i}" for i in range(6)]
    assert m.replay is not None and m.replay.ok and len(m.replay.blocks) == 6
    for bits in (4.25, 5.0, 5.6, 6.25, 7.0, 8.25):
        sol = solve(m.units, (FP4, FP8), sens, bits=bits)
        assert sol.predicted_kl == pytest.approx(brute_force(m.units, (FP4, FP8), sens, bits)[0], rel=1e-12)


def test_searched_mix_beats_naive_mixes_at_equal_bits(six_blocks):
    """Naive: the first or last k blocks in fp8, the rest fp4. The searched mix at the same bits measures lower
    than every last-k mix and no higher than any first-k mix (here the first blocks are the sensitive ones, so
    first-k can be the optimum itself)."""
    m, sens = six_blocks
    names = [u.name for u in m.units]
    cache: dict[tuple[str, ...], float] = {}

    def measured(mix: dict[str, str]) -> float:
        key = tuple(mix[n] for n in names)
        if key not in cache:
            cache[key] = m.kl(mix)
        return cache[key]

    for k in range(1, 6):
        for label, high in (("first", names[:k]), ("last", names[-k:])):
            naive = {n: FP8 if n in high else FP4 for n in names}
            bits = mix_bits(m.units, naive)
            sol = solve(m.units, (FP4, FP8), sens, bits=bits)
            assert mix_bits(m.units, sol.assignment) <= bits
            searched, naive_kl = measured(sol.assignment), measured(naive)
            assert searched <= naive_kl * (1 + 1e-9), (label, k, searched, naive_kl)
            if label == "last":
                assert searched < 0.8 * naive_kl, (k, searched, naive_kl)


def test_replay_is_bit_identical_to_full_forwards():
    model, tok = _tiny(3, seed=1)
    batches = token_batches(tok, _corpus(), 32, 4, 256)
    candidates = (FP4, "nvfp4", "bf16")
    fast = Measurer(model, search_config({"roles": "mlp"}), candidates, "layer", batches, "cpu")
    full_model, _ = _tiny(3, seed=1)
    full = Measurer(full_model, search_config({"roles": "mlp"}), candidates, "layer", batches, "cpu", replay=False)
    assert fast.sensitivities(progress=False) == full.sensitivities(progress=False)
    mix = {u.name: candidates[i % 3] for i, u in enumerate(fast.units)}
    assert fast.measure(mix) == full.measure(mix)
    # one unit alone measures what the sensitivity table says
    unit = fast.units[4].name
    assert fast.kl({unit: "nvfp4"}) == fast.sensitivities(progress=False)[unit]["nvfp4"]


# ---------------------------------------------------------------------------------------------- end to end


def test_search_writes_a_recipe_that_hf_mx_evaluates(tiny_dir, tmp_path, capsys):
    """CLI: search --bits 6 writes a recipe; hf-mx with recipe= applies exactly its formats and reproduces the
    measured KL; --from re-solves without loading the model."""
    out = tmp_path / "recipe.json"
    rc = cli_main(["search", "--model_args", f"pretrained={tiny_dir}", "--candidates", "fp4_e2m1,fp8_e4m3,bf16",
                   "--bits", "6", "--device", "cpu", "--max_tokens", "512", "--max_length", "64", "--output", str(out),
                   "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"pretrained={tiny_dir},recipe={out}" in printed and "KL(baseline ‖ MX) of each layer alone" in printed
    recipe = json.loads(out.read_text())
    assert recipe["avg_bits"] <= 6 and recipe["budget"] == {"bits": 6.0, "max_kl": None}
    assert len(recipe["sensitivities"]) == 14 and recipe["corpus_tokens"] == recipe["measured"]["tokens"]
    assert set(recipe["sensitivities"]["model.layers.0.mlp.down_proj"]) == {FP4, FP8, "bf16"}
    rules = recipe["model_args"]["layer_formats"]
    assert rules[6] == [r"^model\.layers\.0\.mlp\.down_proj$", recipe["assignment"]["model.layers.0.mlp.down_proj"]]
    assert recipe["measured_kl"] > 0 and 0 < recipe["top1_agreement"] <= 1
    assert recipe["uniform"][FP4]["avg_bits"] == 4.25 and recipe["uniform"]["bf16"]["kl_base_mx"] == 0.0
    assert recipe["corpus"]["batch_size"] == 4  # --from measures new mixes in the same batches

    from lm_eval_mx.hf.model import HFMXLM
    from lm_eval_mx.nn.layers import mx_layers

    lm = HFMXLM.create_from_arg_string(f"pretrained={tiny_dir},recipe={out}", {"device": "cpu"})  # lm_eval's path
    formats = {n: m.mx_spec.w.name for n, m in mx_layers(lm.model)}
    assert formats == {u: f for u, f in recipe["assignment"].items() if f != "bf16"}
    assert all(m.mx_spec.a.name == formats[n] for n, m in mx_layers(lm.model))  # W+A, as measured
    assert lm.mx_report.avg_bits() < 16
    base = HFMXLM(pretrained=tiny_dir, device="cpu", roles="none")
    kl = tokens = 0
    for b in token_batches(lm.tokenizer, _corpus(), 64, 4, 512):
        lb, t = _logprobs(base.model, b, torch.device("cpu"))
        kl += kl_sum(lb, _logprobs(lm.model, b, torch.device("cpu"))[0])
        tokens += t.numel()
    assert kl / tokens == pytest.approx(recipe["measured_kl"], rel=1e-6)

    def no_load(*a, **k):
        raise AssertionError("--from --no_measure must not load the model")

    again = tmp_path / "recipe5.json"
    search._load, saved = no_load, search._load
    try:
        cli_main(["search", "--from", str(out), "--bits", "5", "--no_measure", "--output", str(again), "--quiet"])
        with pytest.raises(SystemExit, match=r"--from measures in the recipe's own batches"):
            cli_main(["search", "--from", str(out), "--bits", "5", "--batch_size", "8"])
        with pytest.raises(SystemExit, match=r"--from reuses the recipe's measurements.*--granularity"):
            cli_main(["search", "--from", str(out), "--bits", "5", "--granularity", "block"])
        with pytest.raises(SystemExit, match="--from has sensitivities for fp4_e2m1,fp8_e4m3,bf16 only, not nvfp4"):
            cli_main(["search", "--from", str(out), "--bits", "5", "--candidates", "fp4,nvfp4"])
        bad = tmp_path / "hand_written.json"
        bad.write_text('{"model_args": {"format": "fp4"}}')
        with pytest.raises(SystemExit, match=r"--from: .* lacks candidates"):
            cli_main(["search", "--from", str(bad), "--bits", "5"])
    finally:
        search._load = saved
    re5 = json.loads(again.read_text())
    assert re5["avg_bits"] <= 5 < recipe["avg_bits"] and re5["measured_kl"] is None
    assert re5["predicted_kl"] > recipe["predicted_kl"] and re5["sensitivities"] == recipe["sensitivities"]


def test_validate_evaluates_baseline_recipe_and_uniform_mixes(tiny_dir, tmp_path, capsys):
    """--validate: compare's table of baseline, the recipe and each uniform MX candidate on lm-eval tasks."""
    out = tmp_path / "r.json"
    cli_main(["search", "--model_args", f"pretrained={tiny_dir}", "--candidates", "fp4,fp8,bf16", "--bits", "7",
              "--granularity", "block", "--max_tokens", "256", "--output", str(out), "--quiet",
              "--validate", "mx_corpus_ppl", "--limit", "2"])  # default device: cuda if available, else cpu
    recipe = json.loads(out.read_text())
    assert recipe["model_args"]["layer_formats"] == [[r"^model\.layers\.0\.", FP8], [r"^model\.layers\.1\.", FP4]]
    table = capsys.readouterr().out.split("Baseline vs MX")[1]
    assert all(h in table for h in ("baseline", "search 6.25b", "fp4_e2m1 4.25b", "fp8_e4m3 8.25b", "bits_per_byte"))
    row = next(line for line in table.splitlines() if "bits_per_byte" in line)
    base, ours, _, fp4, _, fp8, _ = (float(c.split()[0]) for c in row.split("│")[3:10])
    assert base < fp8 < ours < fp4  # more bits, closer to the baseline
    written = json.loads((tmp_path / "r_validate" / "compare.json").read_text())
    assert list(written["configs"]) == ["search 6.25b", "fp4_e2m1 4.25b", "fp8_e4m3 8.25b"]


@pytest.mark.slow
def test_two_processes_rank0_measures_others_exit(tiny_dir, tmp_path):
    """Two processes as `accelerate launch --multi_gpu` starts them (torch.distributed.run: RANK, WORLD_SIZE,
    LOCAL_RANK set; `accelerate launch --cpu` starts one process only): rank 1 exits at once with a note,
    rank 0 measures alone (its model loading must not wait for rank 1) and writes the recipe."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "lm_eval_mx.commands.cli", "search", "--model_args", f"pretrained={tiny_dir}", "--candidates", "fp4,fp8",
           "--bits", "6", "--granularity", "block", "--max_tokens", "256", "--quiet", "--output",
           str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2 exits; the measurement is single-process" in proc.stderr
    assert proc.stdout.count("wrote ") == 1
    assert json.loads((tmp_path / "r.json").read_text())["avg_bits"] <= 6


# ---------------------------------------------------------------------------------------------- recipes as input


def _synthetic_recipe(path: Path, candidates: tuple[str, ...] = (FP4, FP8, "bf16")) -> dict:
    """A recipe as search writes it, from a made-up table (no model: --from --no_measure never loads one)."""
    from lm_eval_mx.algorithms.search.recipe import build_recipe

    us = _units([64, 64], candidates)
    sens = {"u0": {FP4: 0.5, FP8: 0.125, "bf16": 0.0}, "u1": {FP4: 0.25, FP8: 0.0625, "bf16": 0.0}}
    sens = {u: {f: row[f] for f in candidates} for u, row in sens.items()}
    uniform = {f: {"avg_bits": float(mix_bits(us, dict.fromkeys(sens, f))), "predicted_kl": sum(s[f] for s in sens.values()),
                   "tokens": 500, "kl_base_mx": sum(s[f] for s in sens.values()), "top1_agreement": 0.9}
               for f in candidates}
    recipe = build_recipe(config_args={}, model_args="pretrained=/no/such/model", candidates=candidates,
                          granularity="layer", units=us, sensitivities=sens, solution=solve(us, candidates, sens, 6),
                          budget={"bits": 6, "max_kl": None}, measured=None, uniform=uniform,
                          corpus={"files": None, "max_tokens": 512, "max_length": 64, "batch_size": 4, "tokens": 500},
                          timing={})
    path.write_text(json.dumps(recipe, indent=2))
    return recipe


@pytest.fixture
def never_load(monkeypatch):
    monkeypatch.setattr(search, "_load", lambda *a, **k: pytest.fail("the model was loaded"))


def test_from_refuses_edited_or_partial_recipes_naming_the_field(tmp_path, never_load):
    src = tmp_path / "r.json"
    good = _synthetic_recipe(src)
    out = tmp_path / "new.json"
    cli_main(["search", "--from", str(src), "--bits", "5", "--no_measure", "--output", str(out), "--quiet"])
    assert json.loads(out.read_text())["avg_bits"] <= 5  # the synthetic recipe itself re-solves

    def edit(fn):
        data = copy.deepcopy(good)
        fn(data)
        src.write_text(json.dumps(data))

    cases = [
        (lambda d: d["unit_bits"]["u0"].pop(FP8), r"unit_bits\['u0'\] lacks candidate fp8_e4m3"),
        (lambda d: d["sensitivities"]["u1"].pop(FP4), r"sensitivities\['u1'\] lacks candidate fp4_e2m1"),
        (lambda d: d.pop("uniform"), "uniform must be an object"),
        (lambda d: d["corpus"].pop("tokens"), "corpus.tokens must be an integer >= 1, got None"),
        (lambda d: d["sensitivities"]["u0"].update({FP4: "0.5"}), r"sensitivities\['u0'\]\['fp4_e2m1'\] must be a number"),
        (lambda d: d["params"].update({"u0": "64"}), r"params\['u0'\] must be an integer >= 1, got '64'"),
        (lambda d: d.update(candidates="fp4_e2m1,fp8_e4m3"), "candidates must be a list of format names"),
        (lambda d: d.update(granularity="blocks"), "granularity must be one of layer, block, got 'blocks'"),
        (lambda d: d["params"].pop("u1"), "params and layers name different units"),
    ]
    for fn, match in cases:
        edit(fn)
        with pytest.raises(SystemExit) as e:
            cli_main(["search", "--from", str(src), "--bits", "5", "--no_measure", "--output", str(out), "--quiet"])
        text = str(e.value.code)
        assert "\n" not in text and text.startswith(f"search: --from {str(src)!r}: "), text
        assert re.search(match, text), (match, text)


def test_from_never_overwrites_its_input_and_output_is_checked_first(tmp_path, never_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "recipe.json"  # the default --output
    _synthetic_recipe(src)
    before = src.read_text()
    for extra in ([], ["--output", str(src)], ["--output", "./recipe.json"]):
        with pytest.raises(SystemExit, match=r"is the --from recipe; the search does not overwrite its input"):
            cli_main(["search", "--from", "recipe.json", "--bits", "5", "--no_measure", "--quiet", *extra])
    assert src.read_text() == before
    for bad in (tmp_path, tmp_path / "missing" / "r.json"):
        with pytest.raises(SystemExit, match=f"--output {bad}: not a file in an existing writable directory"):
            cli_main(["search", "--model_args", "pretrained=/no/such/model", "--candidates", "fp4,fp8", "--bits",
                      "6", "--device", "cpu", "--output", str(bad)])


def test_a_budget_that_keeps_everything_in_bf16_writes_no_recipe(tmp_path, never_load):
    src, out = tmp_path / "r.json", tmp_path / "all_bf16.json"
    _synthetic_recipe(src)
    with pytest.raises(SystemExit, match=r"--max_kl 0 the best mix keeps every unit in bf16: nothing would go to MX"):
        cli_main(["search", "--from", str(src), "--max_kl", "0", "--no_measure", "--output", str(out), "--quiet"])
    with pytest.raises(SystemExit, match=r"--bits 16 the best mix keeps every unit in bf16"):
        cli_main(["search", "--from", str(src), "--bits", "16", "--no_measure", "--output", str(out), "--quiet"])
    assert not out.exists()


def test_a_budget_no_mix_meets_keeps_the_measurements_apart_from_the_recipe(tiny_dir, tmp_path):
    """No mix meets --max_kl 0: the existing recipe at --output is left alone, the measurements go to
    <output>.measurements.json, which --from re-solves and hf-mx refuses as a recipe."""
    out = tmp_path / "recipe.json"
    out.write_text('{"model_args": {"format": "fp8"}}')
    with pytest.raises(SystemExit) as e:
        cli_main(["search", "--model_args", f"pretrained={tiny_dir}", "--candidates", "fp4,fp8", "--max_kl", "0",
                  "--device", "cpu", "--max_tokens", "64", "--max_length", "32", "--output", str(out), "--quiet"])
    kept = tmp_path / "recipe.measurements.json"
    assert f"No recipe written; the measurements are saved in {kept}" in str(e.value.code)
    assert out.read_text() == '{"model_args": {"format": "fp8"}}' and "model_args" not in json.loads(kept.read_text())
    again = tmp_path / "r2.json"
    cli_main(["search", "--from", str(kept), "--max_kl", "100", "--no_measure", "--output", str(again), "--quiet"])
    assert json.loads(again.read_text())["model_args"]["layer_formats"]
    from lm_eval_mx.selection.config import parse_mx_args

    with pytest.raises(ValueError, match="has no 'model_args' object"):
        parse_mx_args({"recipe": str(kept)})
