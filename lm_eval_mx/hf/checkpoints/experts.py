"""Where a stored tensor goes in the model: a linear layer's weight, a fused experts module's 3-D weight as stored
fused (gpt-oss), or one expert's projection stored per expert, as transformers' own conversion rules say.

transformers 5 holds a MoE layer's experts fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
[E, H, I]) and converts per-expert checkpoints while loading by rules it keeps per architecture
(``conversion_mapping``: Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2``, Qwen2/3-MoE's
``mlp.experts.N.gate_proj/up_proj/down_proj``): renamings, then a converter that stacks experts (``MergeModulelist``)
and concatenates its source patterns in order along the output axis (``Concatenate(dim=1)``: gate, then up).
:class:`Locator` applies those same rules to the quantized tensors' names (``...w1.weight_packed`` is read as
``...w1.weight`` would be), so the expert index and the part (0: gate, 1: up) come from transformers, not from names
written here. Qwen2-MoE's rules are also tried for every model: llm-compressor writes Mixtral experts under those
hybrid names (``block_sparse_moe.experts.N.gate_proj``), which transformers' Mixtral rules do not convert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Slot:
    """A stored tensor's place: the model's ``module``, its packed ``weight`` (``weight`` of a linear layer,
    ``gate_up_proj``/``down_proj`` of fused experts), the stored tensor's ``leaf`` name (``weight_packed``, ...),
    and for per-expert storage the ``expert`` and the ``part`` of a concatenated weight."""

    module: str
    weight: str
    leaf: str
    expert: int | None = None
    part: int = 0


class Locator:
    """Maps checkpoint keys of the quantized layers planned for ``model`` to :class:`Slot` (None: another tensor)."""

    def __init__(self, model: nn.Module, layers: dict[str, Any]) -> None:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.layers = layers  # module name -> its packed module
        transforms = list(get_model_conversion_mapping(model)) + list(
            get_checkpoint_conversion_mapping("qwen2_moe") or ())
        self.renamings = [t for t in transforms if type(t) is WeightRenaming]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def renamed(self, key: str) -> str:
        """``key`` after transformers' renamings for this model (Mixtral's ``block_sparse_moe`` -> ``mlp``)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, [])[0]

    def locate(self, key: str) -> Slot | None:
        module, _, leaf = key.rpartition(".")
        m = self.layers.get(module) or self.layers.get(self.renamed(module))
        if m is not None and not _is_experts(m):
            return Slot(module if module in self.layers else self.renamed(module), "weight", leaf)
        owner, _, rest = key.rpartition(".")  # fused storage: "<experts>.<weight>_<leaf>" (gpt-oss's blocks)
        m = self.layers.get(owner)
        if m is not None:
            for weight in m.mx_prequantized:
                if rest.startswith(f"{weight}_"):
                    return Slot(owner, weight, rest.removeprefix(f"{weight}_"))
            return None
        found = _EXPERT.search(key)
        if found is None:
            return None
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(f"{module}.weight", self.renamings, self.converters)
        if pattern is None:
            return None
        owner, _, weight = target.rpartition(".")
        if owner not in self.layers:
            return None
        part = next(c.source_patterns.index(pattern) for c in self.converters if pattern in c.source_patterns)
        return Slot(owner, weight, leaf, int(found.group(1)), part)


def _is_experts(module: nn.Module) -> bool:
    return "weight" not in getattr(module, "mx_prequantized", ())
