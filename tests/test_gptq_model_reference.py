"""GPTQ at model level against an independent plain reference (issue 30, item 3).

The reference is written out for a Llama, without the project's driver (``quantize_model`` / ``gptq_layers``): the
first block's inputs are captured once; then for each block in order, each true-sequential group in order
(``q,k,v`` / ``o`` / ``gate,up`` / ``down``) collects its layers' Hessians by running the block on its current
inputs (the groups before it already quantized), GPTQ-rounds each layer (:func:`gptq_weight`, the per-layer step
tested in ``test_gptq.py``) and writes the fake-quantized weight back (rotated back when rotating); the block's
outputs, computed with all its weights quantized, are the next block's inputs. The codes and scales
``quantize_model`` packs must equal the reference's bit for bit.

Planted bugs this fails (checked by hand when written): calibrating every block on the first block's inputs
(dropping the hand-over of block outputs), and putting a block's layers in one group (no true-sequential order).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_model

from lm_eval_mx.algorithms.gptq import GPTQOptions, HessianAccumulator, gptq_weight, unrotate
from lm_eval_mx.algorithms.quantize_model import quantize_model
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers
from lm_eval_mx.numerics.rotation import Rotation
from lm_eval_mx.selection.config import parse_mx_args

pytestmark = pytest.mark.usefixtures("one_thread")
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
OPTIONS = GPTQOptions(block_columns=16)
BATCH = 4


class _Stop(Exception):
    pass


def reference(model: torch.nn.Module, windows: torch.Tensor, scheme, rotation) -> dict[str, object]:
    """GPTQ over a Llama's blocks as the module docstring says; the results by layer name."""
    blocks = model.model.layers
    inputs = []

    def grab(_m, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for i in range(0, len(windows), BATCH):
            with contextlib.suppress(_Stop):
                model(windows[i:i + BATCH], use_cache=False)
    hook.remove()

    def run(block, item):
        args, kwargs = item
        out = block(*args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out, *args[1:]), kwargs

    results = {}
    with torch.no_grad():
        for b, block in enumerate(blocks):
            for group in GROUPS:
                modules = {name: block.get_submodule(name) for name in group}
                accs = {name: HessianAccumulator(m.in_features, rotation) for name, m in modules.items()}
                hooks = [m.register_forward_pre_hook(lambda _m, a, acc=accs[name]: acc.add(a[0]))
                         for name, m in modules.items()]
                for item in inputs:
                    run(block, item)
                for h in hooks:
                    h.remove()
                for name, m in modules.items():
                    r = gptq_weight(m.weight, accs[name].hessian(), scheme, rotation, OPTIONS)
                    w = r.weight if rotation is None else unrotate(r.weight, rotation)
                    m.weight.copy_(w.to(m.weight.dtype))
                    results[f"model.layers.{b}.{name}"] = r
            inputs = [run(block, item) for item in inputs]
    return results


@pytest.mark.parametrize("keys", [{"format": "mxfp4"}, {"format": "nvfp4", "rotation": "hadamard"}],
                         ids=["mxfp4", "nvfp4-mrgptq"])
def test_quantize_model_equals_the_plain_reference(keys):
    config, _ = parse_mx_args(keys)
    scheme = config.scheme(config.w_format)
    rotation = Rotation(scheme.block_size) if config.rotation == "hadamard" else None
    windows = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    want = reference(tiny_model("llama"), windows, scheme, rotation)
    model = tiny_model("llama")
    quantize_model(model, config, "gptq", windows, OPTIONS, batch_size=BATCH)
    got = {n: m for n, m in mx_layers(model) if isinstance(m, MXPackedLayer)}
    assert got.keys() == want.keys() and len(got) == 14
    for name, m in got.items():
        assert torch.equal(m.weight, want[name].packed.codes), name
        assert torch.equal(m.weight_scales, want[name].packed.scales), name
