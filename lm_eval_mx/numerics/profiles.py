"""Profiles: what one deployment stack computes for each format it runs, as hf-mx keys (``profile=NAME``).

A profile is named and versioned. For each format pair it runs (weights, activations) it gives the MX keys that
reproduce the stack's numerics (scale rule, E4M3 step order, per-tensor scale, whether activations are
quantized at all), the layers the stack quantizes, and the steps in words with the source they transcribe;
for a format pair it does not run, the stack's own reason. For a shipped checkpoint it says what the stack does
with the checkpoint's stated activation recipe. The definitions are in docs (*Profiles*); every rule is pinned by
tests/test_profiles.py against the stack's own code where it runs on CPU, else against a cited transcription.

Plain Python (no torch): a bad ``profile=`` fails before any model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .formats import canonical_name, suggest

# The format pairs (weights, activations) profiles are defined for, by the names users give them.
PAIRS: dict[str, tuple[str, str]] = {
    "mxfp8": ("fp8_e4m3", "fp8_e4m3"),
    "mxfp4": ("fp4_e2m1", "fp4_e2m1"),
    "nvfp4": ("nvfp4", "nvfp4"),
    "mxfp4xmxfp8": ("fp4_e2m1", "fp8_e4m3"),  # MXFP4 weights x MXFP8 activations (W4A8)
}
# The roles every stack quantizes by default (attention and MLP projections), and with the LM head.
_PROJ = "all"
_PROJ_HEAD = "all|lm_head"


class ProfileRefusal(ValueError):
    """The stack does not run this format or checkpoint: its reason."""


@dataclass(frozen=True)
class Rule:
    """What a stack computes for one format pair: MX keys (beside ``format``/``w_format``/``a_format``) and the
    steps in words."""

    keys: dict[str, object]
    steps: str


@dataclass(frozen=True)
class Profile:
    """One stack's numerics, by format pair (a :class:`Rule`, or the stack's reason for not running it) and for
    shipped checkpoints (by layout and activation recipe: ``"checkpoint"`` keeps the recipe, ``"weight_only"``
    drops the activation quantization, a string is the stack's reason for refusing)."""

    name: str
    version: int
    stack: str  # the stack and version it reproduces
    source: str  # repository, paths, version
    layers: str  # which layers it quantizes and what it ignores, in words
    rules: dict[str, Rule | str]
    checkpoints: dict[tuple[str, str], str] = field(default_factory=dict)
    default_checkpoint: str = "checkpoint"

    def rule(self, w_format: str, a_format: str | None) -> Rule:
        """The rule of a format pair; ``ValueError`` with the stack's reason or the pairs it runs."""
        pair = (canonical_name(w_format), None if a_format is None else canonical_name(a_format))
        name = next((n for n, p in PAIRS.items() if p == pair or (pair[1] is None and p[0] == pair[0])), None)
        found = self.rules.get(name) if name else None
        if isinstance(found, str):
            raise ProfileRefusal(f"profile={self.name} ({self.stack}) does not run {name}: {found}")
        if found is None:
            runs = [n for n, r in self.rules.items() if isinstance(r, Rule)]
            raise ValueError(f"profile={self.name} ({self.stack}) has no rule for w_format={pair[0]}, "
                             f"a_format={pair[1]}; its formats: {', '.join(runs) or 'none'} (format=NAME, or "
                             "w_format=fp4_e2m1,a_format=fp8_e4m3 for mxfp4xmxfp8)")
        return found

    def checkpoint(self, layout: str, activations: str | None) -> str:
        """What the stack does with a shipped checkpoint: ``checkpoint`` (its recipe), ``weight_only``; raises
        ``ValueError`` with the stack's reason where it refuses the checkpoint."""
        what = self.checkpoints.get((layout, activations or "none"), self.default_checkpoint)
        if what not in ("checkpoint", "weight_only"):
            raise ProfileRefusal(f"profile={self.name} ({self.stack}) refuses this {layout} checkpoint "
                             f"(activations: {activations or 'none'}): {what}")
        return what

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "stack": self.stack, "source": self.source}


_OCP = Profile(
    "ocp", 1, "microxcaling (OCP MX v1.0 reference)",
    "github.com/microsoft/microxcaling (commit 21221c0) mx/specs.py (MxSpecs defaults: round='nearest'), mx/mx_ops.py "
    "(_shared_exponents: floor(log2 amax) from the exponent bits), mx/elemwise_ops.py (_quantize_elemwise_core); "
    "golden cases in tests/data/microxcaling_mx_golden.npz",
    "the layers the user selects (microxcaling swaps the modules it is given); hf-mx's roles apply",
    {
        "mxfp8": Rule({"scale_mode": "floor", "rounding": "nearest"},
                      "E8M0 scale 2**(floor(log2 bmax) - emax) from the exponent bits; elements x / scale rounded "
                      "to nearest, ties away from zero (MxSpecs default round='nearest'), saturating; weights and "
                      "activations alike, dynamic"),
        "mxfp4": Rule({"scale_mode": "floor", "rounding": "nearest"}, "as mxfp8 with E2M1 elements (emax 2)"),
        "mxfp4xmxfp8": Rule({"scale_mode": "floor", "rounding": "nearest"},
                            "weights MXFP4, activations MXFP8, each as above"),
        "nvfp4": "microxcaling implements the OCP MX formats (E8M0 scales) only; NVFP4's E4M3 scales are not in it",
    },
    default_checkpoint="microxcaling quantizes high-precision models; it reads no quantized checkpoint",
)

_TORCHAO = Profile(
    "torchao", 1, "torchao 0.18 (quantize_ with MXDynamicActivationMXWeightConfig / "
    "NVFP4DynamicActivationNVFP4WeightConfig)",
    "github.com/pytorch/ao v0.18.0 torchao/prototype/mx_formats/inference_workflow.py (scaling_mode default "
    "RCEIL), mx_tensor.py (to_mx), nvfp4_tensor.py (nvfp4_quantize, per_tensor_amax_to_scale); "
    "torchao/quantization/quant_api.py (_is_linear: quantize_'s default filter)",
    "every nn.Linear, the LM head included (quantize_'s default filter_fn _is_linear)",
    {
        "mxfp8": Rule({"scale_mode": "rceil", "roles": _PROJ_HEAD},
                      "E8M0 scale: the exponent of bmax · float32(1/448) rounded up (RCEIL); elements half-even; "
                      "activations dynamic"),
        "mxfp4": Rule({"scale_mode": "rceil", "roles": _PROJ_HEAD}, "as mxfp8 with E2M1 elements (1/6)"),
        "mxfp4xmxfp8": "MXDynamicActivationMXWeightConfig asserts activation_dtype == weight_dtype ('For now - we "
                       "only support matching input/weight dtypes.')",
        "nvfp4": Rule({"e4m3_steps": "clamp", "roles": _PROJ_HEAD},
                      "per-tensor ts = amax / 2688 (dynamic, per input); block scale (bmax / 6) / ts clamped to "
                      "[2**-6, 448], rounded to E4M3; elements x · ((1 / ts) / s) half-even; dequantized "
                      "q · (ts · s)"),
    },
    default_checkpoint="torchao's quantize_ quantizes high-precision models; it does not load compressed-tensors or "
                       "ModelOpt checkpoints",
)

_CT = Profile(
    "compressed-tensors", 2, "compressed-tensors 0.20 (llm-compressor presets MXFP4, NVFP4; forward QDQ)",
    "github.com/vllm-project/compressed-tensors v0.20.1 src/compressed_tensors/quantization/quant_scheme.py "
    "(MXFP4, NVFP4), utils/helpers.py (calculate_qparams, generate_gparam), utils/mxfp_utils.py "
    "(generate_mx_scales, round_to_power_2), lifecycle/forward_helpers.py (_quantize, _dequantize)",
    "the attention and MLP projections; the LM head is left out (llm-compressor's recipes, ignore=['lm_head'], "
    "as benchmarks/profiles/make_ct_checkpoint.py)",
    {
        "mxfp4": Rule({"scale_mode": "even", "roles": _PROJ},
                      "E8M0 scale: bmax rounded half-up to a power of two at E2M1's mantissa (round_to_power_2), "
                      "minus emax; weights and activations (dynamic) alike"),
        "mxfp8": "compressed-tensors 0.20 rounds MXFP8 block maxima at E2M1's mantissa (generate_mx_scales uses "
                 "FP4_E2M1_DATA.mantissa for every format but MXFP6), a rule none of hf-mx's scale modes is",
        "mxfp4xmxfp8": "its MXFP4xFP8 preset quantizes activations to FP8 in groups of 128 with float scales, "
                       "not MXFP8",
        "nvfp4": Rule({"e4m3_steps": "divide", "roles": _PROJ},
                      "global scale gs = 2688 / amax (a multiplier; activations: the input's own amax, as "
                      "calibrating on it); block scale e4m3(gs · (bmax / 6)) with bmax / 6 in the input dtype, 0 "
                      "read as 0.125; elements x / (s / gs) half-even; dequantized q · (s / gs)"),
    },
    checkpoints={
        ("ct-mxfp4", "dynamic"): "checkpoint", ("ct-mxfp4", "none"): "checkpoint", ("ct-nvfp4", "none"): "checkpoint",
        ("ct-nvfp4", "static"): "checkpoint",  # the reader runs its steps: e4m3_steps=divide, the stored multiplier
    },
    default_checkpoint="compressed-tensors loads its own formats only",
)

_AUTOROUND = Profile(
    "auto-round", 2, "auto-round 0.16 (RTN, iters=0: schemes MXFP4, MXFP8; its own MXFP4 / NVFP4 exports)",
    "github.com/intel/auto-round v0.16.1 auto_round/schemes.py (MXFP4, MXFP8: data_type and act_data_type mx_fp, "
    "act_dynamic), auto_round/data_type/mxfp.py (quant_mx: floor(torch.log2(bmax)) - emax, quant_element), "
    "experimental/qmodules/mx.py, nvfp4.py (qdq_input: the runtime of its exports; lm_eval_mx/numerics/runtimes.py)",
    "the attention and MLP projections; the LM head is kept in high precision (auto-round's default "
    "quant_lm_head=False, auto_round/compressors/base.py)",
    {
        "mxfp8": Rule({"scale_mode": "log2", "roles": _PROJ},
                      "E8M0 scale 2**(floor(torch.log2(bmax)) - emax) in float32 (a block maximum a few ulps below "
                      "a power of two rounds up to it), clamped to 2**±127; elements half-even; activations dynamic "
                      "(act_data_type mx_fp)"),
        "mxfp4": Rule({"scale_mode": "log2", "roles": _PROJ}, "as mxfp8 with E2M1 elements"),
        "mxfp4xmxfp8": "auto-round's schemes pair MXFP4 weights with MXFP4 activations only",
        "nvfp4": "auto-round's NVFP4 activation step takes a calibrated input_global_scale (its exports store it); "
                 "a plain model has none: evaluate an auto-round NVFP4 export instead",
    },
    # its own exports: the reader runs auto-round's runtime (numerics.runtimes: auto-round-mx, auto-round-nvfp4)
    checkpoints={(layout, acts): "checkpoint" for layout, acts in
                 (("ar-mxfp4", "dynamic"), ("ar-mxfp4", "none"), ("ar-nvfp4", "static"), ("ar-nvfp4", "none"))},
    default_checkpoint="auto-round's runtime is pinned for its own MXFP4 and NVFP4 exports (layouts ar-mxfp4, "
                       "ar-nvfp4); its MXFP8 export shares compressed-tensors' layout, which this profile does not "
                       "tell apart from llm-compressor's",
)

_QUARK = Profile(
    "quark", 1, "AMD Quark 0.13 (OCP_MXFP4Spec / OCP MX specs, PerBlockMXObserver)",
    "amd-quark 0.13 quark/torch/kernel/hw_emulation/hw_emulation_interface.py (fake_quantize_mx, "
    "scale_calculation_mode='even': even_round), quark/torch/quantization/config/config.py (scale_calculation_mode)",
    "the attention and MLP projections; the LM head excluded (as Quark's vLLM online-quantization configs do: "
    "quark/online_quantization/vllm/hf_quantization_configs.py, exclude=['lm_head'])",
    {
        "mxfp4": Rule({"scale_mode": "even", "roles": _PROJ},
                      "E8M0 scale: bmax rounded half-up to a power of two at the element's mantissa, minus emax; "
                      "weights and activations (dynamic) alike"),
        "mxfp8": Rule({"scale_mode": "even", "roles": _PROJ}, "as mxfp4 with FP8 E4M3 elements"),
        "mxfp4xmxfp8": "a Quark MXFP4-weight x MXFP8-activation scheme is not pinned here",
        "nvfp4": "Quark's NVFP4 is not pinned here",
    },
    default_checkpoint="Quark's runtime for shipped checkpoints is not pinned here",
)

_MARLIN = ("vLLM on compute capability < 10.0 runs FP4 checkpoints with the Marlin W4A16 kernel: the activation "
           "quantization the checkpoint states is dropped (unless VLLM_USE_NVFP4_CT_EMULATIONS forces emulation)")
_VLLM_HOPPER = Profile(
    "vllm-hopper", 1, "vLLM on H100/H200 (sm_90)",
    "github.com/vllm-project/vllm vllm/model_executor/layers/quantization/compressed_tensors/schemes/"
    "compressed_tensors_w4a4_nvfp4.py (get_min_capability: 100, 80 only with VLLM_USE_NVFP4_CT_EMULATIONS), "
    "compressed_tensors_w4a16_nvfp4.py / compressed_tensors_w4a16_mxfp4.py (the W4A16 Marlin schemes), "
    "compressed_tensors.py (_get_scheme_from_parts: MXFP4 weights -> CompressedTensorsW4A16Mxfp4), "
    "utils/marlin_utils_fp4.py (below sm_100: 'Weight-only FP4 compression will be used leveraging the Marlin "
    "kernel'); vLLM issues "
    "#19563, #19879, PR #31926 (NVFP4 W4A4 checkpoints on Hopper run W4A16)",
    "the layers the checkpoint quantized (its ignore list: typically the LM head)",
    {
        "nvfp4": Rule({"weight_only": True, "e4m3_steps": "divide", "roles": _PROJ},
                      "weights as llm-compressor writes them (compressed-tensors' steps); activations in high "
                      "precision (Marlin W4A16)"),
        "mxfp4": Rule({"weight_only": True, "scale_mode": "even", "roles": _PROJ},
                      "weights as llm-compressor writes them (even scales); activations in high precision "
                      "(Marlin W4A16)"),
        "mxfp8": "vLLM's Hopper path for MXFP8 checkpoints is not pinned here",
        "mxfp4xmxfp8": "vLLM's Hopper path for MXFP4 x MXFP8 checkpoints is not pinned here",
    },
    checkpoints={
        ("ct-nvfp4", "static"): "weight_only", ("ct-nvfp4", "dynamic"): "weight_only",
        ("ct-mxfp4", "dynamic"): "weight_only", ("modelopt-nvfp4", "static"): "weight_only",
        ("ct-nvfp4", "none"): "checkpoint", ("ct-mxfp4", "none"): "checkpoint", ("modelopt-nvfp4", "none"): "checkpoint",
    },
    default_checkpoint="vLLM's path for this checkpoint format is not pinned here",
)
_NOT_TRANSCRIBED = "vLLM's MXFP8/MXFP4 activation quantize kernels are not transcribed here"
_VLLM_BLACKWELL = Profile(
    "vllm-blackwell", 1, "vLLM / FlashInfer / TensorRT-LLM NVFP4 on B200 (sm_100), rcp.approx modelled as the "
    "correctly rounded reciprocal",
    "github.com/vllm-project/vllm csrc/quantization/fp4/nvfp4_utils.cuh at 2c9ff65 (cvt_warp_fp16_to_fp4, "
    "reciprocal_approximate_ftz: rcp.approx.ftz.f32, fp32_vec_to_e2m1: cvt.rn.satfinite.e2m1x2.f32); the same "
    "steps in FlashInfer's and TensorRT-LLM's quantization.cuh",
    "the layers the checkpoint quantized (llm-compressor: the projections, the LM head ignored)",
    {
        "nvfp4": Rule({"e4m3_steps": "kernel", "roles": _PROJ},
                      "weights as llm-compressor writes them (compressed-tensors' steps); activations: gs = 2688 / "
                      "amax (the input's own, as calibrating on it), SFValue = e4m3(gs · (bmax · rcp(6))), "
                      "outputScale = rcp(SFValue · rcp(gs)), elements cvt.rn.satfinite.e2m1(x · outputScale); "
                      "rcp = rcp.approx.ftz.f32, modelled as the correctly rounded reciprocal, subnormals flushed"),
        "mxfp4xmxfp8": _NOT_TRANSCRIBED,
        "mxfp4": _NOT_TRANSCRIBED,
        "mxfp8": _NOT_TRANSCRIBED,
    },
    default_checkpoint="its activation step is the FP4 kernel's (rcp steps) with the stored input_global_scale; "
                       "hf-mx runs a shipped checkpoint's inputs as compressed-tensors computes them "
                       "(e4m3_steps=divide) and does not substitute the kernel's steps: not reproduced yet",
)
_FP_QUANT_REASON = ("FP-Quant's one runtime (fp_quant in transformers: QuTLASS kernels or Triton pseudo-quantization) "
                    "runs on GPUs only, so no reference of its quantizer (Hadamard-rotated MXFP4/NVFP4) "
                    "ran or was transcribed here")
_FP_QUANT = Profile(
    "fp-quant", 1, "FP-Quant (IST-DASLab; fp_quant in transformers)",
    "github.com/IST-DASLab/FP-Quant; transformers src/transformers/quantizers/quantizer_fp_quant.py", "n/a",
    {name: _FP_QUANT_REASON for name in PAIRS},
    default_checkpoint=_FP_QUANT_REASON,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (_OCP, _TORCHAO, _CT, _AUTOROUND, _QUARK, _VLLM_HOPPER,
                                                      _VLLM_BLACKWELL, _FP_QUANT)}
ALIASES: dict[str, str] = {"microxcaling": "ocp", "ct": "compressed-tensors", "llm-compressor": "compressed-tensors",
                           "autoround": "auto-round", "amd-quark": "quark", "trtllm": "vllm-blackwell",
                           "fp_quant": "fp-quant"}


def get_profile(name: object) -> Profile:
    """A profile by name or alias; ``ValueError`` listing them."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, ALIASES.get(key.replace("-", "_"), key))
    if key not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid: {', '.join(PROFILES)} (aliases: "
                         f"{', '.join(f'{a}={p}' for a, p in ALIASES.items())})" + suggest(key, list(PROFILES)))
    return PROFILES[key]
