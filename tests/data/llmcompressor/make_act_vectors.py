"""Activation vectors computed by compressed-tensors' own dynamic MX quantization, for tests/test_shipped.py.

    /work/venvs/llmcompressor/bin/python tests/data/llmcompressor/make_act_vectors.py   # compressed-tensors 0.19.0

Inputs: those of tests/data/auto_round/make_act_vectors.py (the same rows). Outputs: the presets' input activations
(MXFP4, MXFP8: dynamic, group 32, uint8 scales; NVFP4: static input_global_scale, local E4M3 block scales) as
compressed-tensors' forward computes them: ``compute_dynamic_scales_and_zp`` then ``fake_quantize``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("ar", os.path.join(HERE, "..", "auto_round", "make_act_vectors.py"))
    ar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ar)
    x = ar.inputs()
    out = {"x": x}
    for preset in ("MXFP4", "MXFP8"):
        args = preset_name_to_scheme(preset, ["Linear"]).input_activations
        scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Linear(64, 64))
        out[preset.lower()] = fake_quantize(x=x, scale=scale, zero_point=zp, args=args).contiguous()
    # NVFP4's static activations (dynamic="local": the stored input_global_scale gs, block scales from each input),
    # rows within the calibrated range; not reproduced by hf-mx yet (docs/_new/autoround.md)
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    gs = torch.tensor([2688.0 / 37.5], dtype=torch.float32)
    scale, zp = compute_dynamic_scales_and_zp(value=x[:10], args=args, module=torch.nn.Linear(64, 64), global_scale=gs)
    out["nvfp4_gs"] = gs
    out["nvfp4_static"] = fake_quantize(x=x[:10], scale=scale, zero_point=zp, args=args, global_scale=gs).contiguous()
    save_file(out, os.path.join(HERE, "act_vectors.safetensors"))


if __name__ == "__main__":
    main()
