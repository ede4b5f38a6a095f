"""Which layers of a causal LM become MX: roles by module structure, not substrings.

A layer's role comes from its own name *and* the block it sits in: GPT-2's
``attn.c_proj`` is ``attn_out`` while ``mlp.c_proj`` is ``mlp_down`` (the
prototype's substring bug quantized both as one).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import BMM_ROLE, ROLES, MXConfig, expand_roles
from .formats import Scheme
from .layers import (
    MXConv1D,
    MXExperts,
    MXLayer,
    MXLinear,
    MXPackedLayer,
    MXSpec,
    convert,
    convert_packed,
    mx_layers,
)
from .rotation import Rotation

_ATTN_BLOCKS = {"attn", "self_attn", "attention", "self_attention", "crossattention", "mixer", "attn_layer"}
_MLP_BLOCKS = {"mlp", "ffn", "feed_forward", "feedforward", "block_sparse_moe", "moe", "ff", "shared_expert", "shared_experts"}
_QKV = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "wqkv", "c_attn", "query_key_value", "query", "key",
    "value", "in_proj", "qkv", "w_pack", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
    "kv_proj", "q", "k", "v",
}
_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj"}
_UP = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "fc_in", "dense_h_to_4h", "wi", "wi_0", "wi_1"}
_DOWN = {"down_proj", "c_proj", "fc2", "w2", "fc_out", "dense_4h_to_h", "wo"}
_ROUTERS = {"router", "gate", "router_gate"}
_UNAMBIGUOUS = (
    dict.fromkeys(_QKV - {"q", "k", "v", "query", "key", "value", "qkv", "in_proj"}, "attn_qkv")
    | dict.fromkeys(("o_proj", "out_proj"), "attn_out")
    | dict.fromkeys(_UP - {"wi", "wi_0", "wi_1", "w1", "w3"}, "mlp_up")
    | dict.fromkeys(_DOWN - {"c_proj", "wo", "w2"}, "mlp_down")
)


@dataclass
class Candidate:
    """A linear-like layer: its name, module, kind (linear/conv1d/experts) and role."""

    name: str
    module: nn.Module
    kind: str
    role: str

    @property
    def numel(self) -> int:
        mixin = _MIXINS[self.kind]
        return sum(getattr(self.module, n).numel() for n in mixin.MX_WEIGHTS if isinstance(getattr(self.module, n, None), torch.Tensor))


_MIXINS: dict[str, type[MXLayer]] = {"linear": MXLinear, "conv1d": MXConv1D, "experts": MXExperts}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, MXLayer):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    if isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3:
        return "experts"
    return None


def classify(name: str, module: nn.Module, kind: str, parent: nn.Module | None, lm_head: nn.Module | None) -> str:
    """The role of one linear-like layer (see ``config.ROLES``)."""
    parts = [p for p in name.split(".") if p != "base_layer"]  # PEFT wraps the original as base_layer
    leaf = parts[-1].lower() if parts else ""
    if module is lm_head:
        return "lm_head"
    if kind == "experts" or "experts" in parts[:-1]:
        return "experts"
    if leaf in _ROUTERS and (leaf != "gate" or (parent is not None and hasattr(parent, "experts"))):
        return "router"
    for block in reversed(parts[:-1]):
        b = block.lower()
        if b in _ATTN_BLOCKS:
            return "attn_qkv" if leaf in _QKV else "attn_out" if leaf in _ATTN_OUT else "other"
        if b in _MLP_BLOCKS:
            return "mlp_up" if leaf in _UP else "mlp_down" if leaf in _DOWN else "other"
    # No enclosing block (e.g. OPT's decoder-layer fc1/fc2): names that mean one thing anywhere.
    return _UNAMBIGUOUS.get(leaf, "other")


def find_candidates(model: nn.Module) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every linear-like layer with its role, and (name, reason) of layers never quantizable."""
    get_out = getattr(model, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else None
    modules = dict(model.named_modules())
    out: list[Candidate] = []
    unusable: list[tuple[str, str]] = []
    for name, module in modules.items():
        kind = _kind(module)
        if kind is None:
            if type(module).__name__.endswith("Router") and getattr(module, "weight", None) is not None:
                unusable.append((name, "router module with its own forward (kept in high precision)"))
            continue
        if any(p.startswith("lora_") for p in name.split(".")):
            unusable.append((name, "PEFT adapter layer (kept in high precision)"))
            continue
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        role = classify(name, module, kind, parent, lm_head)
        bad = [n for n in _MIXINS[kind].MX_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)
               and not getattr(module, n).is_floating_point()]
        if bad:
            unusable.append((name, f"weight {bad[0]} is {getattr(module, bad[0]).dtype}, already quantized"))
            continue
        if kind == "experts" and getattr(module, "has_post_expert_norm", False):
            unusable.append((name, "experts with a post-expert norm are not supported"))
            continue
        out.append(Candidate(name, module, kind, role))
    return out, unusable


@dataclass
class LayerEntry:
    name: str
    role: str
    kind: str
    w_format: str
    a_format: str | None
    params: int
    rotation: str | None = None
    w_bits: float | None = None  # storage bits per weight, block scales included


@dataclass
class MXReport:
    """What ``apply_mx`` did: replaced layers, skipped candidates and why, coverage."""

    config: dict[str, Any]
    replaced: list[LayerEntry] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # name, role, reason
    notes: list[str] = field(default_factory=list)
    total_linear_params: int = 0
    attn_bmm: str | None = None  # format of the attention matmuls, when they are in MX
    packed_bytes: int | None = None  # packed=True: bytes of the replaced layers' codes + scales...
    dense_bytes: int | None = None  # ...and of the same weights in the dtype they were loaded in

    @property
    def replaced_params(self) -> int:
        return sum(e.params for e in self.replaced)

    def avg_bits(self, high_precision_bits: float = 16.0) -> float | None:
        """Storage bits per weight over every selectable linear weight: replaced ones at their scheme's
        bits (scales included), the rest at ``high_precision_bits``; None without linear weights."""
        if not self.total_linear_params:
            return None
        rest = self.total_linear_params - self.replaced_params
        total = sum(e.params * (e.w_bits or high_precision_bits) for e in self.replaced) + rest * high_precision_bits
        return round(total / self.total_linear_params, 4)

    def summary(self) -> dict[str, Any]:
        """Compact form for results files."""
        per_role = Counter(e.role for e in self.replaced)
        per_fmt = Counter(f"w={e.w_format},a={e.a_format or '-'}" for e in self.replaced)
        return {
            "replaced_layers": len(self.replaced),
            "replaced_params": self.replaced_params,
            "linear_params": self.total_linear_params,
            "coverage_pct": round(100 * self.replaced_params / self.total_linear_params, 3) if self.total_linear_params else 0.0,
            "layers_per_role": dict(sorted(per_role.items())),
            "layers_per_format": dict(sorted(per_fmt.items())),
            "layers_per_rotation": dict(Counter(e.rotation for e in self.replaced if e.rotation)),
            "avg_weight_bits": self.avg_bits(),
            "skipped_per_reason": dict(Counter(r for _, _, r in self.skipped)),
            "attn_bmm": self.attn_bmm,
            "packed_weight_bytes": self.packed_bytes,
            "dense_weight_bytes": self.dense_bytes,
            "packed_ratio": round(self.packed_bytes / self.dense_bytes, 4) if self.packed_bytes and self.dense_bytes else None,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": self.summary(),
            "replaced": [vars(e) for e in self.replaced],
            "skipped": [{"name": n, "role": r, "reason": why} for n, r, why in self.skipped],
        }

    def table(self) -> str:
        """A readable per-role table (rendered with rich)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title="MX replacement report", show_lines=False)
        for col in ("role", "replaced", "skipped", "formats (w/a)", "params in MX"):
            t.add_column(col, justify="right" if col in ("replaced", "skipped", "params in MX") else "left")
        for role in ROLES:
            rep = [e for e in self.replaced if e.role == role]
            skp = [s for s in self.skipped if s[1] == role]
            if not rep and not skp:
                continue
            fmts = sorted({f"{e.w_format}/{e.a_format or '-'}" + (f" {e.rotation}" if e.rotation else "") for e in rep})
            t.add_row(role, str(len(rep)), str(len(skp)), ", ".join(fmts) or "-", f"{sum(e.params for e in rep):,}")
        s = self.summary()
        t.caption = (
            f"{s['replaced_layers']} layers, {s['replaced_params']:,} of {s['linear_params']:,} "
            f"linear weights ({s['coverage_pct']:.1f}%) in MX"
            + (f"; attention matmuls in {self.attn_bmm}" if self.attn_bmm else "")
        )
        console = Console(width=110, record=True, file=io.StringIO())
        console.print(t)
        if self.packed_bytes and self.dense_bytes:
            console.print(f"stored packed: {_size(self.packed_bytes)} of MX codes + scales instead of "
                          f"{_size(self.dense_bytes)} ({s['packed_ratio']:.3f}x)")
        for note in self.notes:
            console.print(f"note: {note}")
        return console.export_text()


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.1f} {units[i]}"


class SelectionError(ValueError):
    """The configuration selects nothing, or something the model does not have."""


def _no_match_message(what: str, candidates: list[Candidate]) -> str:
    by_role: dict[str, list[str]] = {}
    for c in candidates:
        by_role.setdefault(c.role, []).append(c.name)
    lines = [f"{what}. Linear-like layers found in this model, by role:"]
    for role, names in by_role.items():
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(f"  {role}: {shown}")
    if not candidates:
        lines.append("  (none: no nn.Linear, Conv1D or fused-experts module)")
    lines.append(
        "Select by role (roles=mlp|attn|all or role names) or by regular expression on module "
        "names, e.g. include='layers\\.\\d+\\.mlp\\.' (exclude= removes matches)."
    )
    return "\n".join(lines)


def select(model: nn.Module, config: MXConfig) -> tuple[list[Candidate], list[tuple[str, str, str]], list[Candidate]]:
    """(selected, skipped (name, role, reason), all candidates). Raises ``SelectionError``."""
    candidates, unusable = find_candidates(model)
    selected: list[Candidate] = []
    skipped: list[tuple[str, str, str]] = [(n, "-", why) for n, why in unusable]
    inc = re.compile(config.include) if config.include else None
    exc = re.compile(config.exclude) if config.exclude else None
    for c in candidates:
        if c.role not in config.roles:
            skipped.append((c.name, c.role, "role not selected"))
        elif inc is not None and not inc.search(c.name):
            skipped.append((c.name, c.role, "does not match include"))
        elif exc is not None and exc.search(c.name):
            skipped.append((c.name, c.role, "matches exclude"))
        else:
            selected.append(c)
    if not config.selects_layers:
        return [], skipped, candidates
    if inc is not None and not any(inc.search(c.name) for c in candidates):
        raise SelectionError(_no_match_message(f"include pattern {config.include!r} matches no linear layer", candidates))
    if exc is not None and not any(exc.search(c.name) for c in candidates):
        raise SelectionError(_no_match_message(f"exclude pattern {config.exclude!r} matches no linear layer", candidates))
    if not selected:
        raise SelectionError(_no_match_message(
            f"the MX configuration (roles={'|'.join(config.roles)}) selects no layer of {type(model).__name__}",
            candidates,
        ))
    roles = {c.role for c in selected}
    missing = [k for k in config.role_formats if not roles & set(expand_roles(k))]
    if missing:
        raise SelectionError(f"role_formats names roles with no selected layer: {', '.join(missing)}")
    _check_rules(config, selected, candidates)
    kept = [c for c in selected if config.formats_for(c.role, c.name) is None]
    for c in kept:
        skipped.append((c.name, c.role, f"layer_formats rule {config.layer_rule(c.name)[0] + 1} keeps it in high precision"))  # type: ignore[index]
    chosen = [c for c in selected if c not in kept]
    if not chosen and not config.attn_bmm:
        raise SelectionError("layer_formats keeps every selected layer in high precision: nothing is in MX "
                             "(use roles=none for the baseline)")
    _check_unused(config, chosen)
    return chosen, skipped, candidates


def _check_unused(config: MXConfig, chosen: list[Candidate]) -> None:
    """Settings that no chosen layer uses, once ``layer_formats`` rules have decided theirs: refused."""
    by_role = [c for c in chosen if config.layer_rule(c.name) is None]  # layers whose formats come from the keys
    roles = {c.role for c in by_role}
    covered = {r for k in config.role_formats for r in expand_roles(k)}  # roles role_formats decides
    by_keys = roles - covered  # roles whose formats come from format/w_format/a_format
    bmm_reads_a = config.attn_bmm and config.bmm_format is None
    unused = [k for k in ("format", "w_format", "a_format") if k in config.given and not by_keys
              and not (k != "w_format" and bmm_reads_a)]
    unused += [f"role_formats {k}" for k in config.role_formats if not roles & set(expand_roles(k))]
    schemes = {config.scheme(f) for c in chosen for f in config.formats_for(c.role, c.name) or () if f}  # type: ignore[union-attr]
    if config.attn_bmm:  # the attention matmuls' operands use the scale keys too
        schemes.add(config.scheme(config.attn_bmm_format))
    if not any(s.is_mx for s in schemes):
        unused += [k for k in ("scale_mode", "scale_bits") if k in config.given]
    if unused:
        raise SelectionError(f"{', '.join(unused)} would be ignored: every selected layer it could act on takes its "
                             "format from a layer_formats rule or role_formats (or from another key)")


def _check_rules(config: MXConfig, selected: list[Candidate], candidates: list[Candidate]) -> None:
    """Every ``layer_formats`` rule must decide at least one selected layer (first match wins)."""
    used = {config.layer_rule(c.name)[0] for c in selected if config.layer_rule(c.name) is not None}  # type: ignore[index]
    for i, (pattern, fmt) in enumerate(config.layer_formats):
        if i in used:
            continue
        anywhere = [c.name for c in candidates if re.search(pattern, c.name)]
        why = (f"it matches only layers that are not selected (e.g. {anywhere[0]}: roles/include/exclude leave it out)"
               if anywhere else "it matches no linear layer")
        earlier = [c.name for c in selected if re.search(pattern, c.name)]
        if earlier:
            why = f"every selected layer it matches (e.g. {earlier[0]}) takes an earlier rule"
        raise SelectionError(_no_match_message(f"layer_formats rule {i + 1} ({pattern}:{fmt}) decides no layer: {why}",
                                               candidates))


def reduction_dims(module: nn.Module, kind: str) -> dict[str, int]:
    """The reduction (input) dimension of each weight of a linear-like layer."""
    mixin = _MIXINS[kind]
    out = {}
    for name in mixin.MX_WEIGHTS:
        w = getattr(module, name, None)
        if isinstance(w, torch.Tensor):
            axis = -2 if kind == "experts" and getattr(module, "is_transposed", False) else mixin.MX_WEIGHTS[name]
            out[name] = w.shape[axis]
    return out


def rotation_for(config: MXConfig, role: str, scheme: Scheme, dims: dict[str, int], where: str) -> Rotation | None:
    """The layer's rotation (None where ``config`` rotates nothing of ``role``), checked against its dimensions.

    The block defaults to the quantization block of ``scheme`` (the activations', or the weights' in
    weight-only mode); every weight's reduction dimension must be a multiple of it.
    """
    if not config.rotates(role):
        return None
    # a power of two or 0, as MXConfig checked
    rotation = Rotation(scheme.block_size if config.rotation_block is None else config.rotation_block, config.rotation_seed)
    for name, dim in dims.items():
        try:
            rotation.block_for(dim)
        except ValueError as e:
            raise SelectionError(f"{where} ({name}): {e}; choose a rotation_block that divides it, or exclude the "
                                 "layer from rotation_roles") from None
    return rotation


def layer_spec(config: MXConfig, c: Candidate) -> MXSpec | None:
    """The numerics of one candidate layer under ``config`` (None: a rule keeps it in high precision)."""
    formats = config.formats_for(c.role, c.name)
    if formats is None:
        return None
    w, a = (config.scheme(f) if f else None for f in formats)
    assert w is not None
    rotation = rotation_for(config, c.role, a or w, reduction_dims(c.module, c.kind), c.name)
    return MXSpec(w, a, rotation, config.mx_backend)


def convert_layers(model: nn.Module, config: MXConfig, keep_original: bool = False, progress: bool = False) -> MXReport:
    """Convert the linear layers that ``config`` selects to MX, in place; return the report.

    With ``config.packed`` the model must still be on the meta device (before its
    checkpoint loads): layers become packed MX layers that the loader fills.
    """
    selected, skipped, candidates = select(model, config)
    report = MXReport(config=config.to_dict(), skipped=skipped)
    report.total_linear_params = sum(c.numel for c in candidates)
    if config.packed:
        real = [c.name for c in selected if any(p.device.type != "meta" for p in c.module.parameters())]
        if real:
            raise ValueError(
                f"packed=True quantizes weights while the checkpoint loads, but {real[0]} is already loaded: "
                "pass lm_eval_mx.hf_quantizer.MXQuantizationConfig to from_pretrained (hf-mx does this)"
            )
        if keep_original:
            raise ValueError("packed=True keeps only the MX codes; keep_original (MX switched off at run time) needs "
                             "the high-precision weights")
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    iterator = selected
    if progress and selected:  # no empty bar for a configuration that selects nothing (compare's baseline)
        from tqdm.auto import tqdm

        iterator = tqdm(selected, desc="MX: quantizing weights", unit="layer", leave=False)
    for c in iterator:
        spec = layer_spec(config, c)
        assert spec is not None  # select() skipped the layers rules keep in high precision
        if emb is not None and c.role == "lm_head" and getattr(c.module, "weight", None) is getattr(emb, "weight", None):
            report.notes.append(
                f"{c.name} shares its weight with the input embeddings: its MX copy is separate, "
                "the embeddings stay in high precision"
            )
        numel = c.numel
        if config.packed:
            convert_packed(c.module, _MIXINS[c.kind], spec, c.role, config.packed_gemm)
        else:
            offloaded = [n for n in _MIXINS[c.kind].MX_WEIGHTS if getattr(getattr(c.module, n, None), "device", None) == torch.device("meta")]
            if offloaded:
                report.notes.append(f"{c.name}: weights are offloaded, quantized at each forward")
            convert(c.module, _MIXINS[c.kind], spec, c.role, keep_original)
        dims = reduction_dims(c.module, c.kind)
        rotation = spec.rotation and ",".join(sorted({f"H{spec.rotation.block_for(d)}" for d in dims.values()}))
        if spec.rotation is not None and spec.rotation.block == 0 and any(spec.rotation.block_for(d) != d
                                                                           for d in dims.values()):
            report.notes.append(f"{c.name}: rotation_block=0 uses {rotation} (the largest power-of-two block dividing "
                                f"{'/'.join(map(str, dims.values()))})")
        row = next(iter(dims.values()))
        report.replaced.append(LayerEntry(c.name, c.role, c.kind, spec.w.name, spec.a.name if spec.a else None, numel,
                                          rotation or None, spec.w.bits(row)))
    return report


def enable_attention(model: nn.Module, config: MXConfig, report: MXReport) -> None:
    """Put the attention matmuls in MX when ``config.attn_bmm`` asks for it (recorded in ``report``)."""
    if not config.attn_bmm:
        return
    from . import attention

    scheme = config.scheme(config.attn_bmm_format)
    rotation = rotation_for(config, BMM_ROLE, scheme, {"head_dim": attention.head_dim(model)}, "attn_bmm (Q, K)")
    attention.enable(model, MXSpec(scheme, scheme, rotation, config.mx_backend))
    report.attn_bmm = scheme.name
    rot = f", Q and K rotated by {rotation.label()} along the head dimension" if rotation else ""
    report.notes.append(f"attention matmuls (Q·Kᵀ, P·V) in {scheme.name} via the '{attention.NAME}' attention "
                        f"function{rot}")


def count_packed_bytes(model: nn.Module, report: MXReport) -> None:
    """Record in ``report`` the bytes of the packed layers' codes + scales and of the dense weights they replace."""
    packed = dense = 0
    for _, m in mx_layers(model):
        if isinstance(m, MXPackedLayer):
            for name in m.mx_prequantized:
                parts = [getattr(m, name), getattr(m, f"{name}_scales"), getattr(m, f"{name}_tensor_scale", None)]
                packed += sum(t.numel() * t.element_size() for t in parts if t is not None)
                dense += m.mx_shapes[name].numel() * m.mx_dtype.itemsize
    report.packed_bytes, report.dense_bytes = packed, dense


def check_config(model: nn.Module, config: MXConfig) -> None:
    """Everything :func:`apply_mx` would refuse on ``model``, without changing it: the selection, every layer's
    rotation against its dimensions, and the attention matmuls (SelectionError or AttentionError)."""
    selected, _, _ = select(model, config)
    for c in selected:
        layer_spec(config, c)
    if config.attn_bmm:
        from . import attention

        rotation_for(config, BMM_ROLE, config.scheme(config.attn_bmm_format), {"head_dim": attention.head_dim(model)},
                     "attn_bmm (Q, K)")
        attention.check(model)


def apply_mx(model: nn.Module, config: MXConfig, keep_original: bool = False, progress: bool = False) -> MXReport:
    """Convert the layers that ``config`` selects to MX (and the attention matmuls), in place.

    ``keep_original=True`` keeps high-precision weights so :func:`layers.mx_disabled`
    can switch MX off at run time (costs the memory of the selected weights).
    """
    report = convert_layers(model, config, keep_original, progress)
    enable_attention(model, config, report)
    return report
