"""``lm-eval-mx quantize --save_format compressed-tensors``: compressed-tensors' own decompressor gives back GPTQ's
values (MXFP4 bit for bit; NVFP4 bit for bit but in the blocks the report lists), transformers + compressed-tensors
loads the output (dense and Mixtral experts), and hf-mx gives the same logits on it as on the packed MX output of the
same run (dense and Mixtral)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file

from lm_eval_mx.commands import cli
from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers
from lm_eval_mx.numerics.packing import unpack_mx

pytest.importorskip("compressed_tensors", minversion="0.20")
from test_shipped import ct_reference_weights  # compressed-tensors' own decompression, per layer

CORPUS = str(Path(__file__).resolve().parents[1] / "tasks" / "corpus" / "us_constitution.txt")
GPTQ = ["--method", "gptq", "--calibration", CORPUS, "--nsamples", "8", "--seqlen", "32", "--block_columns", "32",
        "--device", "cpu"]
IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantize(src: str, cfg: str, out: Path, *extra: str) -> Path:
    assert cli.main(["quantize", "--model_args", f"pretrained={src},{cfg}", "--output", str(out), *GPTQ, *extra]) == 0
    return out


def _hfmx(path: Path) -> HFMXLM:
    return HFMXLM(pretrained=str(path), device="cpu", dtype="float32")


def _logits(lm: HFMXLM) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(IDS).logits


def _packed_values(path: Path) -> dict[str, torch.Tensor]:
    """The packed MX output's weights, float32, by the names compressed-tensors stores (linear layers)."""
    lm = _hfmx(path)
    return {n: unpack_mx(m.mx_packed("weight")) for n, m in mx_layers(lm.model)
            if isinstance(m, MXPackedLayer) and "weight" in m.mx_prequantized}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("llama"))


def test_mxfp4_dense_round_trip_and_logits(tmp_path, llama):
    cfg = "format=mxfp4,scale_mode=even"
    mx = _quantize(llama, cfg, tmp_path / "mx")
    ct = _quantize(llama, cfg, tmp_path / "ct", "--save_format", "compressed-tensors")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp4-pack-quantized" and qc["config_groups"]["group_0"]["input_activations"]["dynamic"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)  # the library's own schema
    ref = ct_reference_weights(str(ct))
    ours = _packed_values(mx)
    assert ref.keys() == ours.keys() and len(ref) == 14
    for name, w in ref.items():
        assert torch.equal(w.view(torch.int32), ours[name].view(torch.int32)), name
    report = json.loads((ct / "mx_quantize.json").read_text())
    assert report["export"]["exact"] and report["origin"]["method"] == "gptq"
    assert torch.equal(_logits(_hfmx(ct)), _logits(_hfmx(mx)))  # hf-mx reads both as the same numerics


def test_transformers_loads_the_output(tmp_path, llama):
    """transformers + compressed-tensors (the library's own runtime) computes the same logits as hf-mx on the
    output, bit for bit (bf16: the library decompresses to bf16), and holds the library's decompressed weights."""
    from transformers import AutoModelForCausalLM

    ct = _quantize(llama, "w_format=mxfp4,weight_only=True", tmp_path / "ct", "--save_format", "compressed-tensors")
    model = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    ours = HFMXLM(pretrained=str(ct), device="cpu", dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(logits, ours.model(IDS).logits)
    ref = ct_reference_weights(str(ct))
    mods = dict(model.named_modules())
    held = {n: mods[n].weight for n in ref if getattr(mods[n], "weight", None) is not None
            and mods[n].weight.is_floating_point()}
    assert held, "transformers held no decompressed weight to compare"
    for name, w in held.items():  # transformers' compressed-tensors path decompresses to the library's values
        assert torch.equal(w.float(), ref[name]), name


def test_nvfp4_deviations_are_the_recorded_blocks(tmp_path, llama):
    mx = _quantize(llama, "format=nvfp4,weight_only=True", tmp_path / "mx")
    ct = _quantize(llama, "format=nvfp4,weight_only=True", tmp_path / "ct", "--save_format", "compressed-tensors")
    tensors, ours = load_file(f"{ct}/model.safetensors"), _packed_values(mx)
    lm = _hfmx(mx)
    layers = dict(mx_layers(lm.model))
    export = json.loads((ct / "mx_quantize.json").read_text())["export"]
    recorded = {d["layer"]: d["blocks_off_in_last_bit"] for d in export["deviations"]}
    assert not export["exact"] and recorded
    ref = ct_reference_weights(str(ct))
    for name, w in ref.items():
        p = layers[name].mx_packed("weight")
        assert torch.equal(tensors[f"{name}.weight_packed"], p.codes)  # GPTQ's codes and scale bytes as they are
        assert torch.equal(tensors[f"{name}.weight_scale"].view(torch.uint8), p.scales)
        differ = (w != ours[name]).reshape(w.shape[0], -1, 16).any(-1)
        assert int(differ.sum()) <= recorded.get(name, 0), name  # only blocks whose scale is off (and zeros agree)


@pytest.fixture(scope="module")
def mixtral_outputs(tmp_path_factory) -> tuple[Path, Path]:
    """GPTQ of a tiny Mixtral (experts included), saved as packed MX and as compressed-tensors."""
    tmp = tmp_path_factory.mktemp("mixtral")
    src = save_tiny(tmp / "src", "mixtral")
    cfg = "format=mxfp4,scale_mode=even,roles=all"
    mx = _quantize(src, cfg, tmp / "mx", "--expert_min_tokens", "8")
    ct = _quantize(src, cfg, tmp / "ct", "--expert_min_tokens", "8", "--save_format", "compressed-tensors")
    return mx, ct


def test_mixtral_experts_round_trip(mixtral_outputs):
    mx, ct = mixtral_outputs
    tensors = load_file(f"{ct}/model.safetensors")
    ref = ct_reference_weights(str(ct))
    experts = _hfmx(mx).model.model.layers[1].mlp.experts
    for e in range(4):
        gate_up = unpack_mx(experts.mx_packed("gate_up_proj", e))
        down = unpack_mx(experts.mx_packed("down_proj", e))
        base = f"model.layers.1.block_sparse_moe.experts.{e}"
        assert torch.equal(torch.cat([ref[f"{base}.w1"], ref[f"{base}.w3"]]), gate_up), e  # gate, then up
        assert torch.equal(ref[f"{base}.w2"], down), e
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # the router, unquantized, as transformers saves it
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.bfloat16).model.layers[1].mlp.experts
    for e in range(4):  # transformers + compressed-tensors put each expert's decompressed weights into the fused tensor
        base = f"model.layers.1.block_sparse_moe.experts.{e}"
        assert torch.equal(loaded.gate_up_proj[e].float(), torch.cat([ref[f"{base}.w1"], ref[f"{base}.w3"]]))
        assert torch.equal(loaded.down_proj[e].float(), ref[f"{base}.w2"])


def test_mixtral_hfmx_logits_equal(mixtral_outputs):
    mx, ct = mixtral_outputs
    assert torch.equal(_logits(_hfmx(ct)), _logits(_hfmx(mx)))


@pytest.mark.parametrize("cfg,match", [
    ("format=mxfp4,rotation=hadamard", "rotation=hadamard rotates"),
    ("format=nvfp4", "activations"),
    ("format=mxfp4", "scale_mode=even"),
    ("format=mxfp8", "stores MXFP4"),
])
def test_refusals(tmp_path, llama, cfg, match, monkeypatch):
    """Every refusal comes before the model's weights load (checked on the model built empty)."""
    monkeypatch.setattr(HFMXLM, "__init__", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match=match):
        _quantize(llama, cfg, tmp_path / "o", "--save_format", "compressed-tensors")
    assert not (tmp_path / "o").exists()
