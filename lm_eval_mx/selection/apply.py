"""Apply an ``MXConfig`` to a model: select layers by role and rule, check every setting is used, convert.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..nn.layers import MXPackedLayer, convert, convert_packed, mx_layers
from ..nn.spec import MXSpec
from ..numerics.formats import Scheme
from ..numerics.rotation import Rotation
from .config import BMM_ROLE, MXConfig, check_fixed_keys, expand_roles
from .report import LayerEntry, MXReport
from .roles import MIXINS, Candidate, find_candidates


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
    if exc is not None and not any(exc.search(c.name) for c in candidates if c.role in config.roles
                                   and (inc is None or inc.search(c.name))):
        hit = next(c for c in candidates if exc.search(c.name))
        raise SelectionError(_no_match_message(
            f"exclude pattern {config.exclude!r} matches no selected layer (it matches e.g. {hit.name}, {hit.role}, "
            f"which roles={'|'.join(config.roles)}{'/include' if inc else ''} leave out already): it would be ignored",
            candidates,
        ))
    if not selected:
        raise SelectionError(_no_match_message(
            f"the MX configuration (roles={'|'.join(config.roles)}) selects no layer of {type(model).__name__}",
            candidates,
        ))
    _check_named_roles(model, config, "roles", {c.role for c in selected}, candidates, skipped)
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
    if config.rotation != "none":
        rotated = {c.role for c in chosen if config.rotates(c.role)} | ({BMM_ROLE} if config.rotates(BMM_ROLE)
                                                                         and config.attn_bmm else set())
        if not rotated:
            raise SelectionError(
                f"rotation=hadamard rotates no matmul here: rotation_roles={'|'.join(config.rotation_roles or ())} "
                f"has no layer in MX (layers in MX by role: {', '.join(sorted({c.role for c in chosen})) or 'none'}"
                f"{', attn_bmm' if config.attn_bmm else ''}); name roles that are in MX, or drop rotation"
            )
        _check_named_roles(model, config, "rotation_roles", {c.role for c in chosen} | ({BMM_ROLE} if config.attn_bmm
                                                                                         else set()), candidates, [])
    return chosen, skipped, candidates


def _check_named_roles(model: nn.Module, config: MXConfig, key: str, found: set[str], candidates: list[Candidate],
                       skipped: list[tuple[str, str, str]]) -> None:
    """Every role or group the user named in ``key`` must have a layer among ``found`` roles (selected layers for
    roles=, layers in MX for rotation_roles=): a name that selects nothing would be dropped silently."""
    empty = [n for n in config.named.get(key, ()) if n != "none"
             and not set(expand_roles(n, key, extra=(BMM_ROLE,))) & found]
    if not empty:
        return
    have = sorted({c.role for c in candidates})
    why = ("in MX (after roles, include, exclude and layer_formats)" if key == "rotation_roles"
           else "selected (after include/exclude)")
    kept = sorted({f"{n} ({r})" for n, _, r in skipped if n and r and "router" in r})
    raise SelectionError(
        f"{key} names {', '.join(empty)}, but no layer of {type(model).__name__} with that role is {why}: it would "
        f"be ignored. Roles of this model's linear layers: {', '.join(have) or 'none'}"
        + (f"; kept in high precision: {', '.join(kept[:2])}" if kept else "")
        + f"; layers with a role {why}: {', '.join(sorted(found)) or 'none'}"
    )


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
    names = [f for c in chosen for f in config.formats_for(c.role, c.name) or () if f]
    try:
        check_fixed_keys(config, names + ([config.attn_bmm_format] if config.attn_bmm else []))
    except ValueError as e:
        raise SelectionError(f"{e} (once layer_formats/role_formats decide each layer's format)") from None
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
    mixin = MIXINS[kind]
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
    w = w.for_weights()  # a kernel's activation step (e4m3_steps=kernel) is not how its weights were quantized
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
                "pass lm_eval_mx.hf.quantizer.MXQuantizationConfig to from_pretrained (hf-mx does this)"
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
            convert_packed(c.module, MIXINS[c.kind], spec, c.role, config.packed_gemm)
        else:
            offloaded = [n for n in MIXINS[c.kind].MX_WEIGHTS if getattr(getattr(c.module, n, None), "device", None) == torch.device("meta")]
            if offloaded:
                report.notes.append(f"{c.name}: weights are offloaded, quantized at each forward")
            convert(c.module, MIXINS[c.kind], spec, c.role, keep_original)
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
    from ..nn import attention

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
        from ..nn import attention

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
