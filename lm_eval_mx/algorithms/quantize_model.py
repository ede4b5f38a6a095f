"""Quantize a loaded causal LM's selected layers once (RTN or GPTQ / MR-GPTQ) and save a packed MX checkpoint.

The layers are those ``apply_mx`` would put in MX (:func:`lm_eval_mx.selection.apply.select`, the same
candidates and :func:`~lm_eval_mx.selection.apply.layer_spec`). ``rtn`` stores exactly what ``packed=True``
stores (``MXPackedLayer.mx_pack``, the loader's own op). ``gptq``:

1. the blocks' inputs (positional and keyword arguments: attention mask, position embeddings, ...) are captured
   for the calibration windows by forward pre-hooks, each block's own (sliding and full attention layers get
   different masks), in one unquantized forward per batch stopped at the last block calibrated; only the first block's
   hidden state is kept;
2. blocks run one after another (:func:`lm_eval_mx.algorithms.gptq.gptq_layers`), each calibrated on the outputs
   of the blocks before it with their weights already quantized; inside a block the layers go in true-sequential
   groups by role, ``[attn_qkv] [attn_out] [mlp_up] [mlp_down]`` then any other role, each group's Hessians taken
   with the groups before it already quantized;
3. activations stay in high precision during calibration (the GPTQ norm: ``a_format`` acts at run time only);
   each rounded weight is written back fake-quantized (rotated back to the original domain when rotating, in the
   weight's dtype) so that later layers see it, and its codes and scales (``GPTQResult.packed``, the scales GPTQ
   rounded on) are kept;
4. fused 3-D experts: one Hessian per expert from the tokens the model's router sends it, ``gate_up_proj``
   (``up_proj``) of every expert, then ``down_proj`` (:mod:`lm_eval_mx.algorithms.gptq_moe`), after the block's
   other groups; an expert with too few tokens is rounded to nearest, recorded per expert in the report;
5. ``lm_head``, when selected: after every block, on the final hidden states (:func:`~.gptq_moe.gptq_head`);
6. every selected layer becomes a packed layer (:func:`lm_eval_mx.nn.layers.convert_packed`) holding those codes.

GPTQ refuses other layers outside the transformer blocks (RTN handles them).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.layers import MXPackedLayer, convert_packed
from ..nn.spec import MXSpec
from ..numerics.packing import MXPacked
from ..selection.apply import layer_spec, select
from ..selection.config import MXConfig
from ..selection.roles import MIXINS, Candidate
from .gptq import GPTQLayer, GPTQOptions, GPTQResult, gptq_layers, set_fake_quantized_weight
from .gptq_moe import expert_layers, expert_names, gptq_head

METHODS = ("rtn", "gptq")
# True-sequential order inside a block; roles not named here come after, in one group each.
GROUP_ORDER = ("attn_qkv", "attn_out", "mlp_up", "mlp_down")
REPORT_FILE = "mx_quantize.json"


class _Stop(Exception):
    """Raised by the capture hook to end the forward at the first block."""


@dataclass
class Planned:
    """A selected layer with its numerics (and, for GPTQ, its block)."""

    candidate: Candidate
    spec: MXSpec
    block: int | None = None


@dataclass
class QuantizeRun:
    """What :func:`quantize_model` did: the layers (per-layer rows) and the GPTQ results by layer name."""

    method: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, GPTQResult] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": len(self.layers)}
        if self.results:
            rs = list(self.results.values())
            gptq_err = sum(r.hessian_error for r in rs)
            rtn_err = sum(r.rtn_hessian_error for r in rs)
            ratios = [r.hessian_error / r.rtn_hessian_error for r in rs if r.rtn_hessian_error > 0]
            out.update({
                "hessian_error": gptq_err,
                "rtn_hessian_error": rtn_err,
                "hessian_error_ratio": gptq_err / rtn_err if rtn_err > 0 else None,
                "worst_layer_ratio": max(ratios) if ratios else None,
                "layers_above_rtn": sum(r.hessian_error > r.rtn_hessian_error for r in rs),
                "relative_damping_max": max(r.relative_damping for r in rs),
                "cholesky_retries": sum(r.cholesky_retries for r in rs),
                "layers_with_retries": sum(r.cholesky_retries > 0 for r in rs),
                "dead_columns": sum(r.dead_columns for r in rs),
            })
        return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ``nn.ModuleList`` holding the most linear layers (``model.layers``,
    ``transformer.h``, ``model.decoder.layers`` ...)."""
    from ..selection.roles import find_candidates

    names = [c.name for c in find_candidates(model)[0]]
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(x.startswith(f"{name}.") for x in names)
            if n and (best is None or n > best[0]):
                best = (n, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks holding linear layers was found")
    return best[1], best[2]


def plan(model: nn.Module, config: MXConfig, method: str) -> list[Planned]:
    """The selected layers and their specs, as ``apply_mx`` would choose them; what the method cannot do is
    refused here, before any work (tied lm_head; for GPTQ: fused experts and layers outside the blocks)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    chosen, _, _ = select(model, config)
    planned = []
    for c in chosen:
        spec = layer_spec(config, c)
        assert spec is not None  # select() leaves out the layers rules keep in high precision
        planned.append(Planned(c, spec))
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "tie_word_embeddings", False) and any(p.candidate.role == "lm_head" for p in planned):
        raise ValueError("the configuration selects lm_head, but this model ties it to the input embeddings "
                         "(tie_word_embeddings=True): a checkpoint holds that weight once, as the embeddings, which "
                         "stay in high precision; leave lm_head out (exclude=lm_head)")
    if method == "gptq":
        prefix, _ = find_blocks(model)
        for p in planned:
            rest = p.candidate.name[len(prefix) + 1:] if p.candidate.name.startswith(f"{prefix}.") else ""
            index = rest.partition(".")[0]
            if p.candidate.role == "lm_head" and not index.isdigit():
                continue  # calibrated after the blocks, on the final hidden states
            if not index.isdigit():
                raise ValueError(f"--method gptq calibrates the layers inside the transformer blocks ({prefix}.N); "
                                 f"{p.candidate.name} ({p.candidate.role}) is outside them: exclude it "
                                 f"(exclude={p.candidate.name.rpartition('.')[2]}) or use --method rtn")
            p.block = int(index)
    return planned


class _Conv1DView:
    """A GPT-2 ``Conv1D`` as :class:`GPTQLayer` needs a layer: ``weight`` [out, in] (a transposed view, so writes
    reach the parameter) and the module's forward pre-hooks."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.T

    def register_forward_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self.module.register_forward_pre_hook(hook)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


@dataclass
class BlockInputs:
    """One calibration batch as the blocks take it: the hidden state entering the next block to run, and every
    block's own other arguments (``calls[i]``: block ``i``'s positional arguments after the hidden state and its
    keyword arguments without ``hidden_states``), as the model passed them: attention mask and position
    embeddings may differ by block (gpt-oss, Gemma: sliding and full attention layers)."""

    hidden: torch.Tensor
    positional: bool  # the hidden state is the first positional argument, else the ``hidden_states`` keyword
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


def capture_block_inputs(model: nn.Module, blocks: list[nn.Module], windows: torch.Tensor, batch_size: int
                         ) -> list[BlockInputs]:
    """The inputs of ``blocks`` (the model's first blocks, in order) for each batch of ``windows`` [n, seqlen],
    from one unquantized forward per batch stopped before the last of them runs."""
    captured: list[BlockInputs] = []

    def grab(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if index == 0:
            captured.append(BlockInputs(args[0] if args else kwargs["hidden_states"], bool(args), []))
        captured[-1].calls.append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if index == len(blocks) - 1:
            raise _Stop

    device = _input_device(model)
    handles = [blk.register_forward_pre_hook(lambda _m, a, k, i=i: grab(i, a, k), with_kwargs=True)
               for i, blk in enumerate(blocks)]
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != -(-windows.shape[0] // batch_size) or any(len(c.calls) != len(blocks) for c in captured):
        raise RuntimeError(f"{type(model).__name__}: the transformer blocks did not run in order for every "
                           "calibration batch")
    return captured


def _run_block(i: int, block: nn.Module, item: BlockInputs) -> BlockInputs:
    args, kwargs = item.calls[i]
    out = block(item.hidden, *args, **kwargs) if item.positional else block(*args, **kwargs, hidden_states=item.hidden)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    return BlockInputs(hidden, item.positional, item.calls)


def _groups(planned: list[Planned], options: GPTQOptions) -> list[list[GPTQLayer]]:
    """The block's layers in true-sequential groups: by role (:data:`GROUP_ORDER`, then other roles), fused
    experts last, as two groups: every expert's first projection, then every expert's ``down_proj``."""
    roles = list(GROUP_ORDER) + sorted({p.candidate.role for p in planned} - set(GROUP_ORDER))
    dense = [p for p in planned if p.candidate.kind != "experts"]
    groups = [[_gptq_layer(p) for p in dense if p.candidate.role == r] for r in roles]
    experts = [p for p in planned if p.candidate.kind == "experts"]
    for stage in (0, 1):
        groups.append([layer for p in experts for layer in expert_layers(
            p.candidate.name, p.candidate.module, expert_names(p.candidate.module)[stage], p.spec.w, p.spec.rotation,
            options.expert_min_tokens)])
    return [g for g in groups if g]


def _gptq_layer(p: Planned) -> GPTQLayer:
    module = _Conv1DView(p.candidate.module) if p.candidate.kind == "conv1d" else p.candidate.module
    return GPTQLayer(p.candidate.name, module, p.spec.w, p.spec.rotation)  # type: ignore[arg-type]


def run_gptq(model: nn.Module, planned: list[Planned], windows: torch.Tensor, options: GPTQOptions,
             batch_size: int = 8, on_layer: Callable[[str, GPTQResult], None] | None = None) -> dict[str, GPTQResult]:
    """Steps 1-3 of the module docstring; returns the results by layer name (each with ``.packed``)."""
    _, blocks = find_blocks(model)
    by_block: dict[int, list[Planned]] = {}
    heads = [p for p in planned if p.block is None]
    for p in planned:
        if p.block is not None:
            by_block.setdefault(p.block, []).append(p)

    def layers(i: int, _block: nn.Module) -> list[list[GPTQLayer]]:
        return _groups(by_block.get(i, []), options)

    def set_weight(layer: GPTQLayer, result: GPTQResult) -> None:
        set_fake_quantized_weight(layer, result)
        if on_layer is not None:
            on_layer(layer.name, result)

    results: dict[str, GPTQResult] = {}
    if by_block:
        used = list(blocks)[: max(by_block) + 1]
        items = capture_block_inputs(model, used, windows, batch_size)
        results = gptq_layers(used, _run_block, layers, items, options, set_weight)
    device = _input_device(model)
    batches = [windows[i : i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
    for p in heads:
        results[p.candidate.name] = gptq_head(model, _gptq_layer(p), batches, options, set_weight)
    return results


def _store(module: MXPackedLayer, tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        setattr(module, key, nn.Parameter(value.contiguous(), requires_grad=False))


def pack_layer(p: Planned, packed: MXPacked | None, gemm: str = "dequant") -> None:
    """Turn a selected layer into a packed MX layer in place: the codes of ``packed`` (GPTQ's), or RTN's
    (``mx_pack`` of its weight, what ``packed=True`` stores) when None."""
    c = p.candidate
    weights = {n: getattr(c.module, n).detach() for n in MIXINS[c.kind].MX_WEIGHTS
               if isinstance(getattr(c.module, n, None), torch.Tensor)}
    module = convert_packed(c.module, MIXINS[c.kind], p.spec, c.role, gemm)
    assert isinstance(module, MXPackedLayer)
    for name, w in weights.items():
        if packed is None:
            with torch.no_grad():
                tensors = module.mx_pack(name, w)
            _store(module, tensors)
        else:
            module.mx_fill(name, packed)


def _gptq_row(result: GPTQResult) -> dict[str, Any]:
    return {"hessian_error": result.hessian_error, "rtn_hessian_error": result.rtn_hessian_error,
            "damping": result.damping, "relative_damping": result.relative_damping,
            "cholesky_retries": result.cholesky_retries, "dead_columns": result.dead_columns,
            "tokens": result.tokens, "fallback": result.fallback}


def pack_experts(p: Planned, packed: dict[str, list[MXPacked]], gemm: str = "dequant") -> None:
    """Fused experts as a packed layer holding each expert's codes (``packed[name][expert]``)."""
    c = p.candidate
    module = convert_packed(c.module, MIXINS[c.kind], p.spec, c.role, gemm)
    assert isinstance(module, MXPackedLayer)
    for name, parts in packed.items():
        for e, part in enumerate(parts):
            module.mx_fill(name, part, index=e)


def _expert_results(c: Candidate, results: dict[str, GPTQResult]) -> dict[str, list[GPTQResult]] | None:
    """GPTQ's results for every expert of fused experts ``c`` by weight name, or None (RTN, or not experts)."""
    if c.kind != "experts":
        return None
    first, second = expert_names(c.module)
    keys = {n: [f"{c.name}.{n}.{e}" for e in range(getattr(c.module, n).shape[0])] for n in first + second}
    if not all(k in results for ks in keys.values() for k in ks):
        return None
    return {n: [results[k] for k in ks] for n, ks in keys.items()}


def _pack_and_report(p: Planned, results: dict[str, GPTQResult], gemm: str) -> dict[str, Any]:
    """Pack one selected layer (GPTQ's codes where it ran, else RTN's) and return its report row; fused experts'
    rows sum their experts' errors and list every expert (tokens, errors, fallback)."""
    c = p.candidate
    row: dict[str, Any] = {"name": c.name, "role": c.role, "kind": c.kind, "w_format": p.spec.w.name,
                           "rotation": p.spec.rotation.label() if p.spec.rotation else None}
    experts = _expert_results(c, results)
    if experts is not None:
        pack_experts(p, {n: [r.packed for r in rs] for n, rs in experts.items()}, gemm)  # type: ignore[misc]
        rs = [r for parts in experts.values() for r in parts]
        row.update(hessian_error=sum(r.hessian_error for r in rs), rtn_hessian_error=sum(r.rtn_hessian_error for r in rs),
                   relative_damping=max(r.relative_damping for r in rs),
                   cholesky_retries=sum(r.cholesky_retries for r in rs),
                   experts_rounded_to_nearest=sum(r.fallback is not None for r in rs),
                   experts=[{"weight": n, "expert": e, **_gptq_row(r)} for n, parts in experts.items()
                            for e, r in enumerate(parts)])
        return row
    result = results.get(c.name)
    pack_layer(p, None if result is None else result.packed, gemm)
    if result is not None:
        row.update(_gptq_row(result))
    return row


def quantize_model(model: nn.Module, config: MXConfig, method: str, windows: torch.Tensor | None = None,
                   options: GPTQOptions | None = None, progress: bool = False, batch_size: int = 8) -> QuantizeRun:
    """Quantize ``model``'s selected layers in place with ``method`` and leave them packed (see the module
    docstring); ``windows`` [n, seqlen] token ids are GPTQ's calibration inputs."""
    model.eval()
    planned = plan(model, config, method)
    run = QuantizeRun(method)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(planned) if method == "rtn" else sum(  # GPTQ reports each expert's weights
            sum(getattr(p.candidate.module, n).shape[0] for names in expert_names(p.candidate.module) for n in names)
            if p.candidate.kind == "experts" else 1 for p in planned)
        bar = tqdm(total=total, desc=f"{method.upper()}: quantizing", unit="weight")
    try:
        if method == "gptq":
            if windows is None or windows.numel() == 0:
                raise ValueError("--method gptq needs calibration windows")
            if options is not None and options.expert_min_tokens is not None and \
                    not any(p.candidate.kind == "experts" for p in planned):
                raise ValueError("--expert_min_tokens would be ignored: no fused MoE experts are selected (it sets "
                                 "when an expert is rounded to nearest for want of routed calibration tokens)")

            def on_layer(name: str, result: GPTQResult) -> None:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{name} err/rtn={result.hessian_error / max(result.rtn_hessian_error, 1e-30):.3f}")

            run.results = run_gptq(model, planned, windows, options or GPTQOptions(), batch_size, on_layer)
        for p in planned:
            run.layers.append(_pack_and_report(p, run.results, config.packed_gemm))
            if bar is not None and p.candidate.name not in run.results:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return run


def save_quantized(model: nn.Module, tokenizer: Any, config: MXConfig, origin: dict[str, Any], run: QuantizeRun,
                   out_dir: str | Path) -> None:
    """``save_pretrained`` of the packed model with ``MXQuantizationConfig(config, origin)`` as its quantization
    config, the tokenizer, and the per-layer report (:data:`REPORT_FILE`)."""
    from ..hf.quantizer import MXQuantizationConfig

    out = Path(out_dir)
    model.config.quantization_config = MXQuantizationConfig(config, origin=origin)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / REPORT_FILE).write_text(json.dumps({"origin": origin, "layers": run.layers}, indent=2) + "\n")
