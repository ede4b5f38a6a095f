"""compare: table maths on synthetic results, sweep expansion, outputs; divergence against a hand computation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lm_eval_mx.algorithms.corpus import token_batches
from lm_eval_mx.algorithms.divergence import exclude_pattern, run_divergence, units_of
from lm_eval_mx.commands.cli import main as cli_main
from lm_eval_mx.commands.compare import expand_sweep
from lm_eval_mx.commands.results_table import Run, build_rows, load_results, plot, to_csv, to_markdown, write_outputs
from lm_eval_mx.hf.testing import build_tokenizer
from lm_eval_mx.nn.layers import mx_layers
from lm_eval_mx.selection.config import MXConfig, parse_mx_args


def fake(acc: float, se: float | None, ppl: float, cfg: dict | None = None) -> dict:
    entry = {"alias": "t", "acc,none": acc, "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"}
    if se is not None:
        entry["acc_stderr,none"] = se
    return {"results": {"task_a": entry}, "config": cfg or {}}


def test_delta_and_significance():
    base = Run("baseline", None, fake(0.60, 0.01, 20.0))
    small = Run("fp8", {}, fake(0.59, 0.01, 21.0))   # |Δ| = 0.01 < sqrt(2)*0.01
    big = Run("fp4", {}, fake(0.55, 0.01, 40.0))     # |Δ| = 0.05 > 0.0141
    rows = {(r.task, r.metric): r for r in build_rows(base, [small, big])}
    acc = rows[("task_a", "acc")]
    assert acc.delta(0) == pytest.approx(-0.01) and acc.delta(1) == pytest.approx(-0.05)
    assert acc.significant(0) is False and acc.significant(1) is True
    ppl = rows[("task_a", "word_perplexity")]
    assert ppl.delta(1) == pytest.approx(20.0) and ppl.significant(1) is None  # no stderr: unknown
    md = to_markdown(list(rows.values()), ["fp8", "fp4"])
    assert "| task_a | acc | 0.6000 ±0.0100 | 0.5900 | -0.0100 | 0.5500 | -0.0500 * |" in md
    csv_text = to_csv(list(rows.values()), ["fp8", "fp4"])
    assert "task_a,acc,fp4,0.55,0.01,-0.05" in csv_text.replace("-0.04999999999999993", "-0.05")


def test_missing_metric_in_mx_run():
    base = Run("baseline", None, fake(0.6, 0.01, 20.0))
    other = Run("x", {}, {"results": {"task_a": {"acc,none": 0.5}}})
    rows = {(r.task, r.metric): r for r in build_rows(base, [other])}
    assert rows[("task_a", "word_perplexity")].values == [None]
    assert rows[("task_a", "acc")].significant(0) is None


def test_outputs_and_reading_results_files(tmp_path):
    base = tmp_path / "base.json"
    mx = tmp_path / "mx.json"
    base.write_text(json.dumps(fake(0.6, 0.01, 20.0)))
    mx.write_text(json.dumps(fake(0.5, 0.01, 30.0, {"mx_config": {"w_format": "fp4_e2m1"}, "mx_label": "fp4_e2m1",
                                                   "mx_report": {"replaced_layers": 7}})))
    off = tmp_path / "off.json"
    off.write_text(json.dumps(fake(0.6, 0.01, 20.0, {"mx_config": {}, "mx_report": {"replaced_layers": 0}})))
    with pytest.raises(SystemExit, match=f"--results: the first file is the baseline, but {mx} is an MX run "
                                         rf"\(fp4_e2m1, per its mx_config/mx_report\); put the baseline first: --results {base}"):
        cli_main(["compare", "--results", str(mx), str(base), "--output_dir", str(tmp_path / "refused")])
    with pytest.raises(SystemExit, match="none of the files is a baseline"):
        cli_main(["compare", "--results", str(mx), str(mx), "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    runs = [load_results(base), load_results(mx)]
    assert runs[1].label == "fp4_e2m1" and runs[0].config is None and runs[0].label == "base"
    assert load_results(off).label == "baseline" and load_results(off).config is None
    paths = write_outputs(runs, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["mx"]["fp4_e2m1"]["delta"] == pytest.approx(-0.1)
    assert paths["png"].stat().st_size > 1000


def test_sweep_expansion():
    combos = expand_sweep("format=fp8_e4m3,fp4_e2m1 block_size=32,16; roles=mlp,mlp_up|attn_qkv")
    assert len(combos) == 8
    assert combos[0] == {"format": "fp8_e4m3", "block_size": 32, "roles": "mlp"}  # typed as --config's values
    assert [c["block_size"] for c in expand_sweep("block_size=32.0,16 format=fp4")] == [32.0, 16]
    assert {c["roles"] for c in combos} == {"mlp", "mlp_up|attn_qkv"}
    with pytest.raises(ValueError, match="valid formats"):
        expand_sweep("format=fp8,fp9")
    with pytest.raises(ValueError, match="key=v1,v2"):
        expand_sweep("format")


def test_divergence_zero_when_mx_off_and_matches_hand_computation():
    tok = build_tokenizer()
    texts = ["We hold these truths to be self-evident, that all men are created equal.",
             "Four score and seven years ago our fathers brought forth on this continent a new nation."]
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    off = run_divergence(model, tok, texts, MXConfig(roles=()), max_length=16, batch_size=2, progress=False)
    assert off["replaced_layers"] == 0
    assert off["metrics"]["kl_base_mx"] == 0.0 and off["metrics"]["top1_agreement"] == 1.0

    model2 = tiny_model("llama")
    model2.resize_token_embeddings(len(tok))
    ref_model = copy.deepcopy(model2)  # the untouched twin
    res = run_divergence(model2, tok, texts, MXConfig(w_format="fp4", a_format="fp4"), max_length=16, batch_size=2,
                         progress=False, sensitivity="block", top_k=1)
    # hand computation: baseline from an untouched twin, MX from the converted model
    batches = token_batches(tok, texts, 16, 2)
    kl = ce_b = ce_m = 0.0
    n = 0
    for b in batches:
        lengths, ids = b[:, 0], b[:, 1:]
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None])
        with torch.no_grad():
            lb = F.log_softmax(ref_model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float(), -1)
            lm = F.log_softmax(model2(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float(), -1)
        m = mask[:, 1:]
        t = ids[:, 1:][m]
        lb, lm = lb[m], lm[m]
        kl += float((lb.exp() * (lb - lm)).sum())
        ce_b += float(-lb.gather(-1, t[:, None]).sum())
        ce_m += float(-lm.gather(-1, t[:, None]).sum())
        n += int(m.sum())
    met = res["metrics"]
    assert met["tokens"] == n
    assert met["kl_base_mx"] == pytest.approx(kl / n, rel=1e-5) and met["kl_base_mx"] > 0
    assert met["ce_base"] == pytest.approx(ce_b / n, rel=1e-6)
    assert met["ce_mx"] == pytest.approx(ce_m / n, rel=1e-6)
    assert met["ppl_mx"] == pytest.approx(math.exp(ce_m / n), rel=1e-6)
    assert len(res["sqnr_db"]) == 14 and all(0 < v < 60 for v in res["sqnr_db"].values())
    sens = res["sensitivity"]
    assert set(sens["kl_alone"]) == {"model.layers.0", "model.layers.1"}
    import re

    assert all(re.search(sens["exclude"], n) for n, _ in mx_layers(model2) if n.startswith(sens["worst"][0] + "."))
    assert units_of(model2, "layer").keys() == {n for n, _ in mx_layers(model2)}
    assert exclude_pattern(["a.b"], "layer") == r"^(?:a\.b$)"
    # a unit outside any block (lm_head) is excluded by its whole name, not as a block prefix
    both = exclude_pattern(["model.layers.1", "lm_head"], "block")
    assert re.search(both, "lm_head") and re.search(both, "model.layers.1.mlp.up_proj")
    assert not re.search(both, "model.layers.10.mlp.up_proj") and not re.search(both, "lm_head_2")


def _nan_runs() -> tuple[Run, Run, Run]:
    """A baseline, a healthy MX run and one whose task had 3 non-finite requests (NaN perplexity, finite acc)."""
    base = Run("baseline", None, fake(0.60, 0.01, 20.0, {"mx_nonfinite_requests": {}}))
    ok = Run("fp8", {}, fake(0.59, 0.01, 21.0, {"mx_nonfinite_requests": {}}))
    bad = fake(0.25, 0.01, float("nan"), {"mx_nonfinite_requests": {"task_a": 3}})
    del bad["results"]["task_a"]["acc_stderr,none"]
    bad["results"]["task_a"]["bits_per_byte,none"] = float("inf")
    return base, ok, Run("fp4", {}, bad)


def test_nonfinite_metrics_show_as_nan_flagged_with_counts(tmp_path):
    """NaN is not '-' (absent); a finite metric of a task with non-finite requests is flagged too."""
    base, ok, bad = _nan_runs()
    rows = {(r.task, r.metric): r for r in build_rows(base, [ok, bad])}
    ppl, acc, bpb = rows[("task_a", "word_perplexity")], rows[("task_a", "acc")], rows[("task_a", "bits_per_byte")]
    assert math.isnan(ppl.values[1]) and math.isnan(ppl.delta(1)) and ppl.significant(1) is None
    assert bpb.baseline is None and bpb.values == [None, float("inf")]  # only the broken run reports it
    assert acc.flagged(1) and not acc.flagged(0) and acc.nonfinite == [0, 3]
    md = to_markdown(list(rows.values()), ["fp8", "fp4"])
    assert "| task_a | word_perplexity | 20.0000 | 21.0000 | +1.0000 ? | NaN ! | NaN ! |" in md
    assert "| task_a | acc | 0.6000 ±0.0100 | 0.5900 | -0.0100 | 0.2500 ! | -0.3500 ! |" in md
    assert "| task_a | bits_per_byte | - | - | - | inf ! | - |" in md
    assert "| task_a | non-finite requests | 0 | 0 |  | 3 |  |" in md
    assert "! NaN/inf value, or the run scored requests of this task non-finite" in md
    lines = to_csv(list(rows.values()), ["fp8", "fp4"]).splitlines()
    assert lines[0].endswith(",nonfinite_requests,flagged")
    assert "task_a,word_perplexity,fp4,nan,,nan,20.0,,,3,True" in lines
    assert "task_a,word_perplexity,fp8,21.0,,1.0,20.0,,,0,False" in lines
    data = json.loads(write_outputs([base, ok, bad], tmp_path)["json"].read_text())
    assert data["nonfinite_requests"] == {"baseline": {}, "fp8": {}, "fp4": {"task_a": 3}}
    entry = next(r for r in data["rows"] if r["metric"] == "word_perplexity")["mx"]["fp4"]
    assert math.isnan(entry["value"]) and entry["flagged"] and entry["nonfinite_requests"] == 3


def test_healthy_table_has_no_flags_and_unrecorded_counts_stay_unknown():
    """Files without mx_nonfinite_requests (plain hf) are 'not recorded', not zero, and raise no flag."""
    rows = build_rows(Run("baseline", None, fake(0.6, 0.01, 20.0)), [Run("x", {}, fake(0.5, 0.01, 30.0))])
    assert rows[0].baseline_nonfinite is None and rows[0].nonfinite == [None]
    md = to_markdown(rows, ["x"])
    assert "!" not in md and "non-finite" not in md


def test_plot_marks_nan_and_absent_deltas_instead_of_zero_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn: dict[str, list] = {"bar": [], "scatter": [], "annotate": [], "ticks": []}
    for name in ("bar", "scatter", "annotate"):
        real = getattr(Axes, name)
        monkeypatch.setattr(Axes, name, lambda self, *a, _n=name, _r=real, **k: drawn[_n].append(a) or _r(self, *a, **k))
    real_ticks = Axes.set_xticks
    monkeypatch.setattr(Axes, "set_xticks", lambda self, t, labels=None, **k: drawn["ticks"].append(labels)
                        or real_ticks(self, t, labels, **k))
    base, ok, bad = _nan_runs()
    rows = [r for r in build_rows(base, [ok, bad]) if r.metric == "word_perplexity"]
    plot(rows, ["fp8", "fp4"], tmp_path / "p.png")
    (positions, heights), = drawn["bar"]
    assert list(positions) == [0] and list(heights) == [pytest.approx(1.0)]  # the NaN run has no bar at all
    assert drawn["scatter"] == [([1], [0])]
    assert [a[0] for a in drawn["annotate"]] == ["NaN"]
    assert drawn["ticks"] == [["fp8", "fp4\n3 non-finite"]]
    drawn["annotate"].clear()
    absent = Run("fp4", {}, {"results": {"task_a": {"acc,none": 0.5}}, "config": {}})
    plot([r for r in build_rows(base, [ok, absent]) if r.metric == "word_perplexity"], ["fp8", "fp4"],
         tmp_path / "q.png")
    assert [a[0] for a in drawn["annotate"]] == ["absent"]


def test_sweep_takes_schemes_and_rotations():
    combos = expand_sweep("format=mxfp4,nvfp4 rotation=none,hadamard")
    labels = [parse_mx_args(c)[0].label() for c in combos]
    assert labels == ["fp4_e2m1", "fp4_e2m1 rot", "nvfp4", "nvfp4 rot"]
    with pytest.raises(ValueError, match="nvfp4 fixes block_size=16"):
        expand_sweep("format=nvfp4 block_size=32")


def test_divergence_reports_sqnr_with_and_without_rotation():
    """With a rotation, each rotated layer's SQNR also without it, on the same inputs; the rotated weights are back
    afterwards (the model's outputs are unchanged by the extra pass)."""
    tok = build_tokenizer()
    texts = ["We hold these truths to be self-evident, that all men are created equal."] * 3
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    cfg = parse_mx_args({"format": "fp4", "rotation": "hadamard", "rotation_roles": "mlp_down"})[0]
    res = run_divergence(model, tok, texts, cfg, max_length=16, batch_size=2, progress=False)
    rotated = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert set(res["sqnr_db_unrotated"]) == rotated
    assert all(res["sqnr_db_unrotated"][n] != res["sqnr_db"][n] for n in rotated)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        after = model(ids).logits
    fresh = tiny_model("llama")
    fresh.resize_token_embeddings(len(tok))
    from lm_eval_mx import apply_mx

    apply_mx(fresh, cfg)
    with torch.no_grad():
        assert torch.equal(after, fresh(ids).logits)
    assert "without rotation" in render_text(res)
    plain = tiny_model("llama")
    plain.resize_token_embeddings(len(tok))
    res = run_divergence(plain, tok, texts, parse_mx_args({"format": "fp4"})[0], max_length=16, batch_size=2,
                         progress=False)
    assert "sqnr_db_unrotated" not in res and "without rotation" not in render_text(res)


def render_text(result) -> str:
    import io

    from rich.console import Console

    from lm_eval_mx.commands.divergence import render

    console = Console(file=io.StringIO(), width=200)
    console.print(render(result))
    return console.file.getvalue()


def test_corpus_option_replaces_the_shipped_corpus(tmp_path):
    """docs/compare.md: --corpus FILES measures on those files instead of tasks/corpus (not in addition to it)."""
    from lm_eval_mx.algorithms.corpus import read_corpus
    from lm_eval_mx.hf.tasks import tasks_dir

    shipped = read_corpus(None)
    assert shipped and read_corpus(sorted((tasks_dir() / "corpus").glob("*.txt"))) == shipped
    mine = tmp_path / "mine.txt"
    mine.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert read_corpus([mine]) == ["First paragraph.", "Second paragraph.\n"]
    both = read_corpus([mine, *sorted((tasks_dir() / "corpus").glob("*.txt"))])  # keeping it: list it too
    assert both == read_corpus([mine]) + shipped


def test_divergence_shows_nan_layers_as_nan_and_ranks_them_worst():
    """int8 with 2-bit scales makes layers NaN: their SQNR and KL are NaN (not inf), ranked worst, the exclude
    pattern keeps the first of them, and top-1 agreement is NaN (not 0 %)."""
    tok = build_tokenizer()
    texts = ["We hold these truths to be self-evident, that all men are created equal."] * 3
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    cfg = parse_mx_args({"format": "int8", "scale_bits": 2})[0]
    res = run_divergence(model, tok, texts, cfg, max_length=16, batch_size=2, progress=False, sensitivity="layer",
                         top_k=1)
    m = res["metrics"]
    assert math.isnan(m["kl_base_mx"]) and math.isnan(m["top1_agreement"]) and m["nonfinite_tokens"] == m["tokens"]
    sqnr = list(res["sqnr_db"].values())
    nan_layers = [n for n, db in res["sqnr_db"].items() if math.isnan(db)]
    assert nan_layers and not any(math.isinf(db) for db in sqnr)
    assert all(math.isnan(db) for db in sqnr[:len(nan_layers)])  # NaN first: the lowest SQNR
    kl = res["sensitivity"]["kl_alone"]
    nan_units = [u for u, v in kl.items() if math.isnan(v)]
    assert nan_units and list(kl)[:len(nan_units)] == nan_units
    finite = [v for v in kl.values() if not math.isnan(v)]
    assert finite == sorted(finite, reverse=True)
    assert res["sensitivity"]["worst"] == nan_units[:1]
    assert res["sensitivity"]["exclude"] == exclude_pattern(nan_units[:1], "layer")
    text = render_text(res)
    assert "nan" not in text and " inf" not in text and "0.00%" not in text
    assert "top-1 agreement │          │ NaN" in text and f"{len(nan_units)} layers make the output NaN alone" in text


def test_compare_help_lists_every_checkpoint_reader(capsys):
    """--checkpoint's help is the readers' registry, every supported format in it (wrapping aside)."""
    from lm_eval_mx.hf.checkpoints import SUPPORTED

    with pytest.raises(SystemExit):
        cli_main(["compare", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps at spaces and after hyphens
    for line in SUPPORTED:
        assert "".join(line.split()) in shown, line
