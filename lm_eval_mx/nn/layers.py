"""MX layer wrappers: ``nn.Linear``, GPT-2 ``Conv1D`` and transformers-5 fused experts.

A selected module keeps its identity: its class is swapped for an MX subclass
(``MXLinear`` etc.), so parameter names, devices, dtypes and accelerate hooks stay
as they were. Weights are quantized once, when the layer is converted; inputs
are quantized in ``forward`` along the reduction axis. With MX switched off
(:func:`mx_disabled`) a layer runs its original class's forward on the
original weights, bit for bit.

Packed layers (``MXPacked*``, :func:`convert_packed`) hold each selected weight
as uint8 codes plus uint8 block scales (E8M0 or E4M3) instead: they are set up on the meta model
before a checkpoint loads and filled by the loader (:mod:`lm_eval_mx.hf.quantizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.backends import resolve_backend
from ..numerics.formats import TensorScale
from ..numerics.packing import MXPacked, pack, packed_layout, unpack_mx
from ..numerics.rotation import rotate
from .attention import bmm_enabled, disable
from .spec import MXSpec


class MXLayer(nn.Module):
    """Mixin of every MX layer. ``MX_WEIGHTS`` maps weight names to their reduction axis."""

    MX_WEIGHTS: dict[str, int] = {}
    mx_spec: MXSpec
    mx_enabled: bool
    mx_role: str
    mx_keep_original: bool
    mx_prequantized: frozenset[str]

    def mx_weight(self, name: str) -> torch.Tensor:
        """The quantized weight: precomputed, or (for offloaded weights) computed now."""
        if name not in self.mx_prequantized:
            return self.mx_spec.weight(getattr(self, name), self._axis(name))
        return getattr(self, f"_mx_{name}" if self.mx_keep_original else name)

    def _axis(self, name: str) -> int:
        return self.MX_WEIGHTS[name]

    def _mx_forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
        if self.mx_enabled:
            return self._mx_forward(*args, **kwargs)
        if not self.mx_keep_original:
            raise RuntimeError(
                "MX was applied without keep_original=True, so the high-precision weights are gone; "
                "apply_mx(model, config, keep_original=True) to switch MX off at run time"
            )
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mx({self.mx_spec.describe()})"


class MXLinear(MXLayer):
    """``F.linear(quantize(x), quantize(W), b)``; W is [out, in], reduction along in."""

    MX_WEIGHTS = {"weight": -1}

    def _mx_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(self.mx_spec.act(x), self.mx_weight("weight"), self.bias)  # type: ignore[arg-type]


class MXConv1D(MXLayer):
    """GPT-2 ``Conv1D``: W is stored [in, out], so the reduction axis is 0."""

    MX_WEIGHTS = {"weight": 0}

    def _mx_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        size_out = (*x.size()[:-1], self.nf)
        xq = self.mx_spec.act(x)
        out = torch.addmm(self.bias, xq.view(-1, xq.size(-1)), self.mx_weight("weight"))  # type: ignore[arg-type]
        return out.view(size_out)


class MXExperts(MXLayer):
    """transformers-5 fused experts (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``).

    Each expert's weight is quantized along its own reduction axis (the input
    dimension: last axis, or the middle one for ``is_transposed`` layouts).
    """

    MX_WEIGHTS = {"gate_up_proj": -1, "up_proj": -1, "down_proj": -1}

    def _axis(self, name: str) -> int:
        return -2 if getattr(self, "is_transposed", False) else -1

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        w = self.mx_weight(name)[expert]
        out = x @ w if getattr(self, "is_transposed", False) else F.linear(x, w)
        if getattr(self, "has_bias", False):
            out = out + getattr(self, f"{name}_bias")[expert]
        return out

    def _input(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """The input of projection ``name`` of ``expert``, quantized: with the expert's own stored per-tensor scale
        where a checkpoint gives one per expert and projection (``mx_a_scales``), else by the layer's spec."""
        scales = getattr(self, "mx_a_scales", None)
        if scales is None:
            return self.mx_spec.act(x)
        return dataclasses.replace(self.mx_spec, a_scale=scales[name][expert]).act(x)

    def _mx_forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        per_expert = getattr(self, "mx_a_scales", None) is not None
        # rows are tokens: quantizing before gathering is exact (unless each expert has its own input scale)
        xq = hidden_states if per_expert else self.mx_spec.act(hidden_states)
        out = torch.zeros_like(hidden_states)
        num_experts = self.down_proj.shape[0]
        has_gate = getattr(self, "has_gate", True)
        up = "gate_up_proj" if has_gate else "up_proj"
        for expert in torch.unique(top_k_index).tolist():
            if expert >= num_experts:  # expert-parallel sentinels
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            x = self._input(xq[token_idx], up, expert) if per_expert else xq[token_idx]
            h = self._project(x, up, expert)
            h = self._apply_gate(h) if has_gate else self.act_fn(h)
            h = self._project(self._input(h, "down_proj", expert), "down_proj", expert)
            h = h * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


class MXPackedLayer(MXLayer):
    """Mixin of packed MX layers: weight ``name`` holds uint8 codes, ``name_scales`` uint8 block scales
    (E8M0, or E4M3 bits), ``name_tensor_scale`` float32 per-tensor scales where the scheme has them.

    Codes are stored with the reduction axis last ([..., out, in]) whatever the
    checkpoint layout; ``mx_shapes`` keeps that logical shape.
    """

    mx_shapes: dict[str, torch.Size]
    mx_dtype: torch.dtype
    mx_gemm: str  # config.PACKED_GEMMS
    # Weights whose ``_tensor_scale`` divides the E4M3 block scales (``s8 / ts``: compressed-tensors'
    # ``weight_global_scale`` stored as it is, see ``MXPacked.tensor_scale_divides``); dequantized in torch.
    mx_ts_divides: frozenset[str] = frozenset()

    def mx_pack(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pack a checkpoint tensor for weight ``name``: ``{name: codes, name_scales: scales}`` (and
        ``name_tensor_scale`` for schemes with a per-tensor scale: one per matrix, so per expert).

        Rows are packed in chunks, so the float32 temporaries stay small next to the weight.
        """
        w = self._reduction_last(name, w.detach())
        spec = self.mx_spec
        step = max(1, (1 << 24) // w.shape[-1])
        per_tensor = spec.w.tensor_scale is TensorScale.AMAX
        parts, scales = [], []
        for m in w.reshape(-1, *w.shape[-2:]):  # one matrix (expert) at a time: its own per-tensor scale
            amax = None
            if per_tensor:
                amax = (m.float() if spec.rotation is None else rotate(m, spec.rotation)).abs().amax()
            chunks = [pack(m[i : i + step], spec.w, spec.rotation, amax) for i in range(0, m.shape[0], step)]
            parts += chunks
            scales.append(chunks[0].tensor_scale)
        codes_shape, scales_shape, _ = packed_layout(w.shape, spec.w.elem, spec.w.block_size)
        self.mx_dtype = w.dtype
        out = {
            name: torch.cat([p.codes for p in parts]).reshape(codes_shape),
            f"{name}_scales": torch.cat([p.scales for p in parts]).reshape(scales_shape),
        }
        if per_tensor:
            out[f"{name}_tensor_scale"] = torch.stack(scales).reshape(w.shape[:-2])
        return out

    def mx_stored(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor a packed checkpoint stores for this layer: codes (under the weight's
        name), ``_scales`` and, for schemes with a per-tensor scale, ``_tensor_scale``."""
        out = {}
        for name in self.mx_prequantized:
            shape = self.mx_shapes[name]
            codes, scales, _ = packed_layout(shape, self.mx_spec.w.elem, self.mx_spec.w.block_size)
            out[name], out[f"{name}_scales"] = (tuple(codes), torch.uint8), (tuple(scales), torch.uint8)
            if self.mx_spec.w.tensor_scale is TensorScale.AMAX:
                out[f"{name}_tensor_scale"] = (tuple(shape[:-2]), torch.float32)
        return out

    def mx_expect_codes(self) -> None:
        """For a checkpoint that stores packed codes: each weight becomes an empty uint8 parameter of the codes'
        shape (on the weight's device, meta before loading), so the loader puts the stored codes there as they are.
        The module is marked initialised: transformers cannot fill missing integer tensors (the quantizer refuses
        a checkpoint that lacks one)."""
        for name in self.mx_prequantized:
            w = getattr(self, name)
            shape = self.mx_stored()[name][0]
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=w.device), requires_grad=False))
        self._is_hf_initialized = True

    def mx_packed(self, name: str, index: int | None = None) -> MXPacked:
        """Weight ``name`` (or its slice ``index`` along the first axis, e.g. one expert) as ``MXPacked``."""
        codes, scales, shape = getattr(self, name), getattr(self, f"{name}_scales"), self.mx_shapes[name]
        ts = getattr(self, f"{name}_tensor_scale", None)
        if codes.dtype != torch.uint8:
            raise RuntimeError(f"{type(self).__name__}.{name} was never packed: the checkpoint did not provide it")
        if index is not None:
            codes, scales, shape = codes[index], scales[index], shape[1:]
            ts = None if ts is None else ts[index]
        scheme = self.mx_spec.w
        bs = packed_layout(shape, scheme.elem, scheme.block_size)[2]
        return MXPacked(codes, scales, shape, scheme, bs, ts, name in self.mx_ts_divides)

    def mx_fill(self, name: str, packed: MXPacked, index: int | None = None) -> None:
        """Put ``packed`` into weight ``name`` as it is (codes, scale bytes, per-tensor scale): the inverse of
        :meth:`mx_packed`, the one way every reader and quantizer fills a packed layer. ``index``: the slice along
        the first axis (one expert of fused experts), written into the layer's tensors, which are allocated on
        ``packed``'s device the first time (a layer set up on the meta device). ``ValueError`` naming what
        disagrees with the layer (shape, element format, block size, per-tensor scale)."""
        shape = self.mx_shapes[name] if index is None else self.mx_shapes[name][1:]
        scheme = self.mx_spec.w
        codes_shape, scales_shape, _ = packed_layout(shape, scheme.elem, scheme.block_size)
        has_ts = scheme.tensor_scale is TensorScale.AMAX
        why = ("shape" if tuple(packed.shape) != tuple(shape) else "element format" if packed.fmt != scheme.elem
               else "block size" if packed.scheme.block_size != scheme.block_size
               else "per-tensor scale" if (packed.tensor_scale is not None) != has_ts else None)
        if why:
            raise ValueError(f"{name}{'' if index is None else f'[{index}]'}: {why} differs: packed "
                             f"{tuple(packed.shape)} {packed.scheme.name}, the layer holds {tuple(shape)} {scheme.name}")
        tensors = {name: packed.codes.reshape(codes_shape), f"{name}_scales": packed.scales.reshape(scales_shape)}
        if has_ts:
            tensors[f"{name}_tensor_scale"] = packed.tensor_scale.to(torch.float32).reshape(shape[:-2])
        divides = name in self.mx_ts_divides
        filled = index is not None and getattr(self, name).device.type != "meta"  # another expert came first
        if filled and packed.tensor_scale_divides != divides:
            raise ValueError(f"{name}[{index}]: its per-tensor scale divides the block scales where the other "
                             "experts' multiply them (or the reverse); fill all experts at once")
        self.mx_ts_divides = (self.mx_ts_divides | {name}) if packed.tensor_scale_divides \
            else (self.mx_ts_divides - {name})
        for key, value in tensors.items():
            if index is None:
                setattr(self, key, nn.Parameter(value.contiguous(), requires_grad=False))
                continue
            full = getattr(self, key)
            if full.device.type == "meta" or full.dtype != value.dtype or full.device != value.device:
                full = nn.Parameter(torch.empty((self.mx_shapes[name][0], *value.shape), dtype=value.dtype,
                                                device=value.device), requires_grad=False)
                setattr(self, key, full)
            full.data[index].copy_(value)

    def _reduction_last(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weight ``name`` in the packed layout (reduction axis last) from the module's, or back: a swap."""
        axis = self._axis(name)
        return w if axis in (-1, w.dim() - 1) else w.transpose(axis, -1)

    def mx_weight(self, name: str) -> torch.Tensor:
        """The dequantized weight in the module's layout (rotated when the layer rotates)."""
        return self._reduction_last(name, unpack_mx(self.mx_packed(name), self.mx_dtype))

    def mx_linear(self, x: torch.Tensor, name: str, bias: torch.Tensor | None, index: int | None = None) -> torch.Tensor:
        """``F.linear(x, W, bias)`` with packed W: the Triton GEMM on CUDA, else dequantize + F.linear."""
        p = self.mx_packed(name, index)
        if x.is_cuda and resolve_backend(self.mx_spec.backend) == "triton" and not p.tensor_scale_divides:
            from ..kernels.triton_mx import mx_packed_linear_triton, mx_unpack_triton

            if self.mx_gemm == "fused":
                return mx_packed_linear_triton(x, p, bias)
            return F.linear(x, mx_unpack_triton(p, x.dtype), bias)
        return F.linear(x, unpack_mx(p, x.dtype), bias)


class MXPackedLinear(MXPackedLayer, MXLinear):
    def _mx_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.mx_linear(self.mx_spec.act(x), "weight", self.bias)


class MXPackedConv1D(MXPackedLayer, MXConv1D):
    """GPT-2 ``Conv1D`` packed as [out, in] (transposed from its [in, out] storage)."""

    def _mx_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.mx_linear(self.mx_spec.act(x), "weight", self.bias)


class MXPackedExperts(MXPackedLayer, MXExperts):
    """Fused experts packed per expert as [experts, out, in]."""

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        bias = getattr(self, f"{name}_bias")[expert] if getattr(self, "has_bias", False) else None
        return self.mx_linear(x, name, bias, index=expert)


PACKED: dict[type[MXLayer], type[MXPackedLayer]] = {
    MXLinear: MXPackedLinear, MXConv1D: MXPackedConv1D, MXExperts: MXPackedExperts,
}


@functools.cache
def _mx_class(mixin: type[MXLayer], base: type[nn.Module]) -> type[nn.Module]:
    prefix = "MXPacked" if issubclass(mixin, MXPackedLayer) else "MX"
    return type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": __name__})


def _swap(module: nn.Module, mixin: type[MXLayer], spec: MXSpec, role: str, keep_original: bool) -> list[str]:
    """Swap ``module``'s class for its MX subclass; returns the names of its weights to quantize."""
    names = [n for n in mixin.MX_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)]
    module.__class__ = _mx_class(mixin, type(module))
    module.mx_spec, module.mx_role = spec, role
    module.mx_enabled, module.mx_keep_original = True, keep_original
    if hasattr(module, "_old_forward"):  # accelerate hook: it must call the MX forward
        module._old_forward = types.MethodType(type(module).forward, module)
    return names


def convert_packed(module: nn.Module, mixin: type[MXLayer], spec: MXSpec, role: str, gemm: str = "dequant") -> nn.Module:
    """Turn a module of a meta-device model into a packed MX layer, ready to be loaded.

    Its weights stay as they are (the loader replaces them with codes); a uint8
    ``<name>_scales`` parameter of the packed shape is added next to each.
    """
    packed = PACKED[mixin]
    names = _swap(module, packed, spec, role, keep_original=False)
    module.mx_prequantized = frozenset(names)
    module.mx_gemm = gemm
    module.mx_shapes = {}
    for name in names:
        w = getattr(module, name)
        shape = module._reduction_last(name, w).shape
        module.mx_shapes[name] = shape
        module.mx_dtype = w.dtype
        scales_shape = packed_layout(shape, spec.w.elem, spec.w.block_size)[1]
        module.register_parameter(
            f"{name}_scales", nn.Parameter(torch.empty(scales_shape, dtype=torch.uint8, device=w.device), requires_grad=False)
        )
        if spec.w.tensor_scale is TensorScale.AMAX:
            module.register_parameter(
                f"{name}_tensor_scale",
                nn.Parameter(torch.empty(shape[:-2], dtype=torch.float32, device=w.device), requires_grad=False),
            )
    return module


def convert(
    module: nn.Module, mixin: type[MXLayer], spec: MXSpec, role: str, keep_original: bool
) -> nn.Module:
    """Turn ``module`` into an MX layer in place and quantize its weights once.

    Weights on the meta device (offloaded by accelerate) are quantized per forward
    after the hook loads them. Without ``keep_original`` each quantized weight
    replaces its parameter (a new Parameter, so a tied partner keeps its values).
    """
    names = _swap(module, mixin, spec, role, keep_original)
    done = set()
    for name in names:
        w = getattr(module, name)
        if w.device.type == "meta":
            continue
        with torch.no_grad():
            q = spec.weight(w.detach(), module._axis(name))
        if keep_original:
            module.register_buffer(f"_mx_{name}", q, persistent=False)
        else:
            setattr(module, name, nn.Parameter(q, requires_grad=False))
        done.add(name)
    module.mx_prequantized = frozenset(done)
    return module


def quantized_weights(module: MXLayer, spec: MXSpec) -> dict[str, torch.Tensor]:
    """The weights of an MX layer that kept its originals, quantized with ``spec`` (not installed)."""
    if not module.mx_keep_original or isinstance(module, MXPackedLayer):
        raise RuntimeError("another spec needs the high-precision weights: apply_mx(..., keep_original=True)")
    with torch.no_grad():
        return {name: spec.weight(getattr(module, name).detach(), module._axis(name)) for name in module.mx_prequantized}


def set_spec(module: MXLayer, spec: MXSpec, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Switch an MX layer (with its originals kept) to other numerics in place: ``weights`` from
    :func:`quantized_weights` (computed here when None). Used to measure many formats on one model copy."""
    weights = quantized_weights(module, spec) if weights is None else weights
    if set(weights) != set(module.mx_prequantized):
        raise ValueError(f"set_spec: weights for {sorted(weights)}, the layer has {sorted(module.mx_prequantized)}")
    for name, q in weights.items():
        setattr(module, f"_mx_{name}", q)
    module.mx_spec = spec


def remove_mx(model: nn.Module) -> int:
    """Undo :func:`convert` on every MX layer that kept its original weights (and MX attention).

    Returns the number of layers restored.
    """
    disable(model)
    n = 0
    for _, module in list(mx_layers(model)):
        if not module.mx_keep_original:
            raise RuntimeError("cannot remove MX from layers converted without keep_original=True")
        for name in module.mx_prequantized:
            delattr(module, f"_mx_{name}")
        base = type(module).__bases__[1]  # MX<Base> has bases (mixin, Base)
        for attr in ("mx_spec", "mx_role", "mx_enabled", "mx_keep_original", "mx_prequantized"):
            module.__dict__.pop(attr, None)
        module.__class__ = base
        if hasattr(module, "_old_forward"):
            module._old_forward = types.MethodType(base.forward, module)
        n += 1
    return n


def mx_layers(model: nn.Module) -> Iterator[tuple[str, MXLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MXLayer):
            yield name, module


@contextlib.contextmanager
def mx_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with every MX layer (and MX attention matmul) switched off.

    Needs ``keep_original=True``. MX attention switched off runs plain eager attention.
    """
    named = list(mx_layers(model))
    layers = [m for _, m in named]
    missing = [n for n, m in named if not m.mx_keep_original]
    if missing:
        raise RuntimeError(
            f"cannot switch MX off: {len(missing)} layers (e.g. {missing[0]}) dropped their original "
            "weights; apply_mx(..., keep_original=True) keeps them"
        )
    before = [m.mx_enabled for m in layers]
    try:
        for m in layers:
            m.mx_enabled = False
        with bmm_enabled(model, False):
            yield model
    finally:
        for m, state in zip(layers, before):
            m.mx_enabled = state


@contextlib.contextmanager
def mx_only(model: nn.Module, names: set[str]) -> Iterator[nn.Module]:
    """Run ``model`` with MX on only in the named layers (sensitivity analysis)."""
    with mx_disabled(model):
        chosen = [m for n, m in mx_layers(model) if n in names]
        for m in chosen:
            m.mx_enabled = True
        yield model
