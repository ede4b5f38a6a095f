"""The one parser of MX arguments: every key is used or refused with the reason, before any model load."""

from __future__ import annotations

import json

import pytest

from lm_eval_mx.numerics.formats import NAMED_SCHEMES, ScaleFormat, TensorScale
from lm_eval_mx.selection.config import MX_KEYS, MXConfig, parse_mx_args


def cfg(**kw):
    return parse_mx_args(kw)[0]


@pytest.mark.parametrize(
    "args, match",
    [
        # empty values: an empty include used to select every role, lm_head and routers included
        ({"include": ""}, "include is empty"),
        ({"exclude": ""}, "exclude is empty"),
        ({"roles": ""}, "roles is empty"),
        ({"roles": "|"}, "roles='|' names no role"),
        ({"w_format": " "}, "w_format is empty"),
        # settings that would be dropped
        ({"weight_only": True, "a_format": "fp4"}, "a_format would be ignored: weight_only=True"),
        ({"roles": "none", "role_formats": "mlp:fp4"}, "role_formats would be ignored: roles=none"),
        ({"roles": "none", "exclude": "x"}, "exclude would be ignored: roles=none"),
        ({"roles": "none", "format": "fp4"}, "format would be ignored: roles=none"),
        ({"roles": "none", "block_size": 16}, "block_size would be ignored: roles=none"),
        ({"roles": "attn", "role_formats": "mlp:fp4"}, "names 'mlp', which is not among the selected roles"),
        ({"role_formats": "mlp:fp4|mlp:int8"}, "names mlp more than once"),
        ({"role_formats": ":fp4"}, "a rule names no role"),
        ({"rotation_block": 16}, "rotation_block would be ignored: they need rotation=hadamard"),
        ({"rotation_seed": 1}, "rotation_seed would be ignored"),
        ({"rotation": "hadamard", "rotation_roles": "lm_head"}, "rotation_roles names lm_head, not in MX here"),
        ({"rotation": "hadamard", "rotation_roles": "attn_bmm"}, "rotation_roles names attn_bmm, not in MX here"),
        ({"rotation": "hadamard", "rotation_block": 24}, "rotation_block must be a power of two"),
        ({"rotation": "givens"}, "rotation must be one of none, hadamard"),
        ({"roles": "none", "rotation": "hadamard"}, "rotation=hadamard would be ignored"),
        ({"packed": True, "packed_gemm": "fused", "mx_backend": "torch"}, "packed_gemm=fused is a Triton kernel"),
        ({"mx_backend": "cuda"}, "mx_backend must be one of auto, torch, triton"),
        # values lm-eval's CLI turned into numbers
        ({"exclude": 0.1}, r"exclude=0.1 is not a regular expression: lm-eval's --model_args turns number-like"),
        ({"block_size": 32.5}, "block_size must be an integer, got 32.5"),
        ({"include": "(("}, "include: invalid regular expression"),
        # schemes
        ({"format": "nvfp4", "block_size": 32}, "nvfp4 fixes block_size=16 but block_size=32 was given"),
        ({"format": "nvfp4", "scale_bits": 6}, "scale_bits shapes E8M0 .* it would be ignored"),
        ({"format": "nvfp4", "scale_mode": "ceil"}, "scale_mode shapes E8M0"),
        ({"format": "fp4", "tensor_scale": "amax"}, "tensor_scale=amax needs scale_format=e4m3"),
        ({"format": "fp4", "scale_format": "e4m3", "scale_bits": 7}, "scale_bits and scale_mode shape E8M0"),
        ({"format": "nvfp5"}, "unknown MX element format 'nvfp5'; valid formats: .*[(]did you mean nvfp4"),
        ({"scale_format": "e5m2"}, "unknown scale_format 'e5m2'; valid: e4m3, e8m0"),
        ({"layer_formats": "x:fp9"}, "unknown MX element format 'fp9'"),
        ({"layer_formats": "x"}, "expected 'pattern:format' rules"),
        ({"layer_formats": ":fp4"}, "a rule has an empty pattern"),
        ({"layer_formats": "a:fp4|a:fp8"}, "pattern 'a' is given twice"),
        # settings the attention matmuls' own format leaves unused
        ({"weight_only": True, "attn_bmm": True, "a_format": "fp4", "bmm_format": "fp8"}, "a_format would be ignored"),
        ({"roles": "none", "attn_bmm": True, "a_format": "fp4", "bmm_format": "fp8"}, "a_format would be ignored"),
        ({"roles": "none", "attn_bmm": True, "format": "fp4", "bmm_format": "fp8"}, "format would be ignored"),
        ({"roles": "none", "include": "mlp"}, "include would be ignored: roles=none"),
        ({"roles": "none|mlp"}, "roles=none|mlp: none means no role and cannot be combined"),
        ({"packed_gemm": "dequant"}, "packed_gemm chooses how packed weights are multiplied: it needs packed=True"),
        ({"rotation": "hadamard", "block_size": 24}, "rotation_block defaults to the block size, 24, which is not a power"),
        ({"rotation": "hadamard", "rotation_seed": 2**70}, r"rotation_seed must be an integer in \[0, 2\*\*63\)"),
        ({"rotation": "hadamard", "rotation_seed": -1}, r"rotation_seed must be an integer in \[0, 2\*\*63\)"),
        # issue 25: a None format is not the keyword none
        ({"layer_formats": {"mlp": None}}, r"layer_formats: rule \('mlp', None\) has format None; .*bf16 or none"),
        ({"layer_formats": [["mlp", None]]}, "has format None"),
        ({"layer_formats": "mlp:"}, "layer_formats: rule 'mlp' has an empty format"),
        ({"role_formats": {"mlp": None}}, "role_formats: mlp has format None"),
        ({"role_formats": "mlp:"}, "role_formats: mlp has an empty format"),
        ({"role_formats": "mlp:fp9"}, "role_formats mlp: unknown MX element format 'fp9'"),
        ({"rotation": "hadamard", "rotation_block": 1}, "rotation_block=1 is the identity"),
        ({"format": "nvfp4", "scale_format": "e4m3"}, "scale_format would be ignored: every format in use here"),
        ({"format": "nvfp4", "tensor_scale": "amax"}, "tensor_scale would be ignored"),
        ({"include": ["q_proj", "k_proj"]}, "include takes one regular expression, got a list"),
        ({"exclude": ("q_proj",)}, "exclude takes one regular expression, got a tuple"),
        ({"include": b"q_proj"}, "include must be a regular expression .a string., got bytes"),
        ({"recipe": ""}, "recipe='' names no file; give the path of a recipe JSON file"),
        ({"recipe": None}, "recipe=None names no file"),
        ({"recipe": "."}, "recipe: '.' is a directory"),
    ],
)
def test_refused_with_the_reason(args, match):
    with pytest.raises(ValueError, match=match):
        parse_mx_args(args)


def test_accepted_forms():
    assert cfg(block_size=32.0).block_size == 32  # lm-eval's CLI reads +32 as 32.0
    assert cfg(block_size="+16").block_size == 16
    assert cfg(weight_only=True, a_format="fp4", attn_bmm=True).attn_bmm_format == "fp4_e2m1"  # used by attn_bmm
    assert cfg(roles="none", attn_bmm=True, format="fp4").attn_bmm_format == "fp4_e2m1"
    rest = parse_mx_args({"backend": "causal", "format": "fp4"})[1]
    assert rest == {"backend": "causal"}  # hf's own key, no longer an MX key
    assert "backend" not in MX_KEYS and "mx_backend" in MX_KEYS
    with pytest.raises(ValueError, match="role_formats names mlp more than once"):
        MXConfig(role_formats={"mlp": "fp4", "MLP ": "fp8"})  # the Python API's dict, keys differing in case
    assert "given" not in MX_KEYS  # MXConfig's record of the keys given is not itself a key
    assert "named" not in MX_KEYS
    assert parse_mx_args({"given": "format"})[1] == {"given": "format"}


def test_nvfp4_and_mixed_schemes():
    c = cfg(format="nvfp4")
    nv = c.scheme(c.w_format)
    assert nv == NAMED_SCHEMES["nvfp4"] and nv.block_size == 16 and nv.scale_format is ScaleFormat.E4M3
    assert nv.tensor_scale is TensorScale.AMAX and nv.bits() == 4.5
    # the separate keys reach other design points (a block of 32 with E4M3 scales)
    c = cfg(format="fp4_e2m1", block_size=32, scale_format="e4m3", tensor_scale="amax")
    assert c.scheme(c.w_format).block_size == 32 and c.scheme(c.w_format).name == "fp4_e2m1/b32/e4m3+amax"
    c = cfg(role_formats="attn:mxfp8|mlp:nvfp4", scale_mode="ceil")  # scale_mode acts on attn's E8M0
    assert c.formats_for("attn_qkv") == ("fp8_e4m3", "fp8_e4m3") and c.formats_for("mlp_down") == ("nvfp4", "nvfp4")
    assert c.scheme("fp8_e4m3").scale_mode.value == "ceil" and c.scheme("nvfp4") == NAMED_SCHEMES["nvfp4"]
    # a key nvfp4 fixes itself has no effect, even when it agrees: refused as scale_mode is
    with pytest.raises(ValueError, match=r"block_size would be ignored: every format in use here \(nvfp4\) is a fixed"):
        cfg(format="nvfp4", block_size=16)


def test_scheme_bits_include_the_scales():
    bits = {n: s.bits() for n, s in NAMED_SCHEMES.items()}
    assert bits == {"mxfp8": 8.25, "mxfp8_e5m2": 8.25, "mxfp6_e2m3": 6.25, "mxfp6_e3m2": 6.25, "mxfp4": 4.25,
                    "mxint8": 8.25, "mxint4": 4.25, "mxint2": 2.25, "nvfp4": 4.5}
    assert cfg(format="fp4", block_size=16).scheme("fp4_e2m1").bits() == 4.5
    assert cfg(format="fp4", block_size=0).scheme("fp4_e2m1").bits(row=256) == 4 + 8 / 256


def test_layer_formats_first_match_wins():
    c = cfg(layer_formats=r"layers\.0\..*:fp8_e4m3|.*mlp.*:fp4_e2m1|.*:bf16")
    assert c.formats_for("mlp_up", "model.layers.0.mlp.up_proj") == ("fp8_e4m3", "fp8_e4m3")
    assert c.formats_for("mlp_up", "model.layers.1.mlp.up_proj") == ("fp4_e2m1", "fp4_e2m1")
    assert c.formats_for("attn_qkv", "model.layers.1.self_attn.q_proj") is None  # bf16: high precision
    c = cfg(layer_formats=[("a", "nvfp4")], role_formats="mlp:fp4")
    assert c.formats_for("mlp_up", "b") == ("fp4_e2m1", "fp4_e2m1") and c.formats_for("mlp_up", "a") == ("nvfp4",) * 2


def test_recipe_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model_args": {"format": "fp4", "mlp_only": True, "layer_formats": [["mlp", "fp8"]]},
                                "avg_bits": 5}))
    c, rest = parse_mx_args({"recipe": str(path), "mx_backend": "torch", "dtype": "float32"})
    assert c.w_format == "fp4_e2m1" and c.layer_formats == (("mlp", "fp8_e4m3"),) and rest == {"dtype": "float32"}
    assert c.roles == ("mlp_up", "mlp_down", "experts") and c.mx_backend == "torch"
    with pytest.raises(ValueError, match="recipe sets format too"):
        parse_mx_args({"recipe": str(path), "format": "fp8"})
    with pytest.raises(ValueError, match="recipe: no such file"):
        parse_mx_args({"recipe": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.json.* as JSON"):
        parse_mx_args({"recipe": str(tmp_path / "bad.json")})
    (tmp_path / "other.json").write_text(json.dumps({"model_args": {"pretrained": "x"}}))
    with pytest.raises(ValueError, match="keys that are not MX keys: pretrained"):
        parse_mx_args({"recipe": str(tmp_path / "other.json")})


def test_equal_configs_compare_equal():
    assert cfg(format="mxfp4") == cfg(w_format="fp4_e2m1", a_format="e2m1")
    assert MXConfig(**cfg(format="nvfp4", rotation="hadamard").to_dict()) == cfg(format="nvfp4", rotation="hadamard")


def test_none_values_through_lm_eval_s_cli_parser():
    """lm-eval's --model_args parser turns the word none into Python None: roles=none, rotation=none and
    tensor_scale=none still mean "none"; other keys say what happened."""
    from lm_eval.utils import simple_parse_args_string

    def cli(text):
        return parse_mx_args(simple_parse_args_string(text))[0]

    assert not cli("roles=none").enabled and cli("roles=none").label() == "baseline"
    assert cli("roles=none,attn_bmm=True").attn_bmm and cli("roles=none,attn_bmm=True").roles == ()
    assert cli("rotation=None").rotation == "none" and cli("rotation=Hadamard").rotation == "hadamard"
    assert cli("format=fp4,scale_format=e4m3,tensor_scale=none").tensor_scale == "none"
    with pytest.raises(ValueError, match="include=None: lm-eval's --model_args turns the word none into Python None"):
        cli("include=none")


def test_beside_a_recipe_only_keys_that_keep_its_numerics(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model_args": {"roles": "mlp", "layer_formats": [[".*", "fp4"]]}}))
    assert parse_mx_args({"recipe": str(path), "mx_backend": "torch", "attn_bmm": True})[0].mx_backend == "torch"
    for key, value in (("weight_only", True), ("block_size", 16), ("rotation", "hadamard"), ("format", "int8")):
        with pytest.raises(ValueError, match=f"{key} would change the numerics the recipe was measured with"):
            parse_mx_args({"recipe": str(path), key: value})


def test_issue_25_accepted_forms(tmp_path):
    import re

    assert cfg(mx_backend="TORCH").mx_backend == "torch"  # any case, as every other enumerated key
    assert cfg(packed=True, packed_gemm="DEQUANT").packed_gemm == "dequant"
    assert MXConfig(mx_backend="Torch").mx_backend == "torch"
    assert cfg(include=re.compile(r"mlp\.")).include == r"mlp\."  # a compiled pattern: its .pattern
    # (role, format) pairs, as documented
    assert cfg(role_formats=[("mlp", "fp4"), ("attn", "nvfp4")]).role_formats == {"mlp": "fp4_e2m1", "attn": "nvfp4"}
    assert cfg(role_formats=(["mlp", "fp4"],)).role_formats == {"mlp": "fp4_e2m1"}


def test_recipe_values_compare_normalised(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model_args": {"format": "fp4", "attn_bmm": "True", "roles": "mlp"}}))
    c = parse_mx_args({"recipe": str(path), "format": "fp4_e2m1", "attn_bmm": True, "roles": "MLP"})[0]
    assert c.w_format == "fp4_e2m1" and c.attn_bmm
    with pytest.raises(ValueError, match="recipe sets format too"):
        parse_mx_args({"recipe": str(path), "format": "fp8"})
    path.write_text(json.dumps({"model_args": {"roles": None, "format": "fp4"}}))
    with pytest.raises(ValueError, match=r"sets roles to null; write the value"):
        parse_mx_args({"recipe": str(path)})


def test_labels_say_what_is_used():
    assert cfg(layer_formats=".*:fp4").label() == "1 layer rule (fp4_e2m1)"
    assert cfg(layer_formats="mlp:fp4|.*:nvfp4", format="int8").label() == "int8 2 layer rules (fp4_e2m1/nvfp4)"
    assert cfg(scale_format="e8m0", scale_bits=8).label() == "fp8_e4m3 e8m0"  # not "e8m0 e8m0"
    assert cfg(layer_formats=".*:fp4", attn_bmm=True).label() == "1 layer rule (fp4_e2m1) bmm:fp8_e4m3"
