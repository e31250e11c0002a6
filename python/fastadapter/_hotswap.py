"""`fastadapter.hotswap` and `fastadapter.prepare_for_hotswap`: PEFT's `hotswap_adapter` /
`prepare_model_for_compiled_hotswap`, on every host (a PeftModel, a transformers model with adapters,
fastadapter's own layers), in place.

A swap replaces the weights of an existing adapter with a file's, keeping every parameter object and its
storage, so a `torch.compile`d model runs the new adapter without recompiling. As in PEFT: the file may
target the same modules or a subset (the others are zeroed), use another alpha (the scaling is
updated, in place where `prepare_for_hotswap` made it a tensor), and another rank up to the rank the
model holds (the weights are zero-padded: the extra rows / columns contribute nothing). Unlike PEFT's:
- every tensor is checked before the first byte is copied (PEFT checks keys, not shapes, and swaps
  tensors it meets one by one), so a refused file leaves the model exactly as it was;
- a rank above the held one is refused (PEFT replaces the parameter: no longer in place, and a
  compiled model recompiles) instead of growing the parameter;
- the adapter's config becomes the file's, so a save after the swap writes the adapter that is loaded
  (PEFT keeps the old config: peft#3581). Where the held rank R is above the file's r (padding), the
  config says rank R with alpha scaled so that alpha/R (alpha/sqrt(R) with rsLoRA) is the file's
  scaling: what is saved reloads, padded, to the same outputs;
- `alpha_pattern` may differ between the adapters (each layer's scaling is computed from it).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ._assign import _resolve_model_tensor, check_shape, slot_suffixes
from ._core import SafetensorsFile, read_chunks
from ._device_load import to_devices
from ._inject import pattern_key
from ._read import Incoming, _check_all_selected, read_weights, renames
from ._tensors import mapped_tensors
from .errors import MissingTensorError, TargetModuleError, TensorError, UnsupportedAdapterError
from .hosts import AdapterHost, host_for
from .names import ADAPTER_WEIGHTS, DEFAULT_ADAPTER, PEFT_PREFIX

# What must match between the adapter held and the file: settings the forward reads besides the
# weights and the scaling (PEFT's CONFIG_KEYS_TO_CHECK, less alpha_pattern: scaling is per layer here).
_SAME_SETTINGS = ("peft_type", "use_rslora", "lora_dropout", "use_dora")
# Slots whose dimension 0 (A) or 1 (B) is the rank; the others (bias, magnitude) have no rank dimension.
_RANK_DIM = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": 1, "lora_embedding_B": 1}
_HUB_ONLY = ("revision", "cache_dir", "token", "use_auth_token", "local_files_only")


@dataclass
class _Layer:
    """One LoRA layer of the adapter being swapped, and what the file gives it."""

    path: str  # relative to the model whose modules hold the layers (the config's key space)
    module: Any  # a LoRA layer, PEFT's or fastadapter's
    live: dict[str, torch.Tensor]  # slot -> the model's tensor
    incoming: dict[str, torch.Tensor] = field(default_factory=dict)  # slot -> the file's tensor

    @property
    def held_rank(self) -> int:
        return _rank(self.live)


def _rank(tensors: dict[str, torch.Tensor]) -> int:
    slot = "lora_A.weight" if "lora_A.weight" in tensors else "lora_embedding_A"
    return tensors[slot].shape[0]


def hotswap(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace the weights of adapter `adapter_name` with those saved in `adapter_dir`, in place
    (PEFT's `hotswap_adapter(model, model_name_or_path, adapter_name, torch_device)`). `model` may be
    `torch.compile`d. Each weight stays on its device (`torch_device` is accepted for PEFT's signature;
    the weights go where the adapter's are). `subfolder` is PEFT's keyword; the hub's are refused."""
    _swap(model, local_directory(adapter_dir, kwargs), adapter_name, as_peft=False)


def local_directory(adapter_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> str:
    """The adapter directory a swap reads (`subfolder` joined); TypeError for the hub's keywords or any
    other. Takes what it knows out of `kwargs`."""
    directory = os.fspath(adapter_dir)
    subfolder = kwargs.pop("subfolder", None)
    if subfolder:
        directory = os.path.join(directory, subfolder)
    hub = [k for k in _HUB_ONLY if kwargs.pop(k, None) not in (None, False)]
    if hub or kwargs:
        raise TypeError(
            f"hotswap reads a local adapter directory; unsupported argument(s) {hub + list(kwargs)}"
        )
    return directory


def swap_as_peft(model: nn.Module, directory: str, adapter_name: str) -> None:
    """PEFT's own `hotswap_adapter` on a PeftModel, with its result: the weights swapped as `hotswap`
    swaps them and each swapped layer's scaling set, but the adapter's config and the layers' `lora_alpha`
    left as they were (PEFT updates neither: peft#3581). What PEFT's function does differently from
    `hotswap` (its errors, its quirks) is refused with `UnsupportedAdapterError` before anything changes,
    for the caller to run PEFT's own: merged adapters, layers other than `lora.Linear`, tensors of the file
    that are not LoRA weights, and an adapter name found elsewhere in the model's state-dict keys (PEFT
    zeroes every `lora_` key that contains it). The caller checks the configs (PEFT's check and
    `check_compatible`) and leaves DoRA, `lora_bias` and rank/alpha patterns to PEFT."""
    _swap(model, directory, adapter_name, as_peft=True)


def _swap(model: nn.Module, directory: str, adapter_name: str, *, as_peft: bool) -> None:
    root = _uncompiled(model)
    host = host_for(root)
    old = host.require(adapter_name)
    new = host.new_config(directory, is_trainable=not old.inference_mode)
    check_compatible(old, new, directory)
    incoming, stored = _read(directory, adapter_name)
    try:
        tuned = _tuned(host, root)
        layers, paths = _held_layers(tuned, adapter_name)
        if as_peft:
            _refuse_unlike_peft(layers, paths, host.configs(), adapter_name)
        others = _match(tuned, layers, incoming.tensors, adapter_name, incoming.where)
        if as_peft and others:
            raise UnsupportedAdapterError(
                f"{incoming.where}: tensors that are not LoRA weights (PEFT's hotswap_adapter does not "
                "copy them)"
            )
        alphas = {p: _check_config_rank(layer, new, incoming.where) for p, layer in layers.items()}
        _refuse_merged(layers, adapter_name)
        staged = _staged(layers)  # device copies may fail (memory): still before any change
        # A cold file's disk reads, begun in _read beside the checks, end here: the copies below then come
        # from the page cache (pread beside them fought them for the disk: 3.5x the read, not 1.2x), and
        # a read that failed (the file cut short under us) is raised before anything changes.
        incoming.ready()
        with torch.no_grad():
            reads = []
            for layer in layers.values():
                reads.extend(_swap_layer(layer, staged, stored))
            if reads:
                # The weights are usually views of the private mapping of the file they were loaded
                # from: writing them page by page would copy each page first (copy-on-write).
                read_chunks(incoming.where, reads, replace_pages=True)
            for existing, value in others:
                existing.copy_(value)
        for path, layer in layers.items():
            if layer.incoming:
                rank = _rank(layer.incoming)
                _set_scaling(layer.module, adapter_name, alphas[path], rank, new.use_rslora, not as_peft)
        if not as_peft:
            held = {p: (x.held_rank, _rank(x.incoming), alphas[p]) for p, x in layers.items() if x.incoming}
            _replace_config(old, _held_config(new, held))
    finally:
        incoming.done()


# Segments of PEFT's state-dict keys under a LoRA layer besides module paths and adapter names.
_KEY_WORDS = (
    "base_model",
    "model",
    "_orig_mod",
    "base_layer",
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "weight",
    "bias",
)


def _refuse_unlike_peft(
    layers: dict[str, _Layer], paths: list[str], configs: dict[str, Any], name: str
) -> None:
    from peft.tuners.lora import Linear

    if any(name in getattr(layer.module, "merged_adapters", ()) for layer in layers.values()):
        raise UnsupportedAdapterError(f"adapter {name!r} is merged (PEFT raises its own error)")
    odd = next((x for x in layers.values() if type(x.module) is not Linear), None)
    if odd is not None:
        raise UnsupportedAdapterError(
            f"`{odd.path}` is a {type(odd.module).__name__} (PEFT's hotswap_adapter handles lora.Linear "
            "alike, not others)"
        )
    # PEFT zeroes every state-dict key holding "lora_" and the name that the file does not hold: with the
    # name inside another segment (another adapter's name, a module's), that is more than this adapter.
    segments = {seg for path in paths for seg in path.split(".")}
    segments.update(_KEY_WORDS)
    segments.update(n for n in configs if n != name)
    if "." in name or any(name in seg for seg in segments):
        raise UnsupportedAdapterError(
            f"adapter name {name!r} is part of other state-dict keys (PEFT's hotswap_adapter zeroes those)"
        )


def prepare_for_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model holding its first adapter(s) for swaps of other ranks and alphas without
    recompilation (PEFT's `prepare_model_for_compiled_hotswap`, same arguments): every scaling becomes a
    0-d tensor (updated in place by a swap), and with `target_rank` every adapter's weights are
    zero-padded to that rank. The model's configs are updated so that a save still reloads (rank
    `target_rank`, alpha scaled to keep each layer's scaling); `config` (PEFT's argument) is updated the
    same way. Call it before `torch.compile`."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', not {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None):
        if check_compiled == "error":
            raise ValueError("call prepare_for_hotswap *before* compiling the model")
        if check_compiled == "warn":
            import warnings

            warnings.warn("prepare_for_hotswap on a compiled model: expect a recompilation", stacklevel=2)
    root = _uncompiled(model)
    host = host_for(root)
    configs = host.configs()
    tuned = _tuned(host, root)
    per_adapter = {name: _held_layers(tuned, name)[0] for name in configs}
    if not any(per_adapter.values()):
        raise ValueError("the model has no adapter layers: load the first adapter before preparing")
    if target_rank is not None:
        too_big = [(n, p, x.held_rank) for n, ls in per_adapter.items() for p, x in ls.items()]
        too_big = [x for x in too_big if x[2] > target_rank]
        if too_big:
            name, path, rank = too_big[0]
            raise ValueError(f"adapter {name!r} has rank {rank} at `{path}`, above target_rank={target_rank}")
    for name, layers in per_adapter.items():
        held: dict[str, tuple[int, int, float]] = {}
        for path, layer in layers.items():
            rank = layer.held_rank
            alpha = float(layer.module.lora_alpha[name])
            _tensor_scaling(layer.module, name)
            if target_rank is not None and rank < target_rank:
                _pad(layer, target_rank)
            held[path] = (layer.held_rank, _config_rank(configs[name], path, rank), alpha)
        prepared = _held_config(configs[name], held)
        if prepared is not configs[name]:
            _replace_config(configs[name], prepared)
    if config is not None and target_rank is not None:
        for c in config.values() if isinstance(config, dict) else [config]:
            c.r = target_rank
            c.rank_pattern = dict.fromkeys(c.rank_pattern or {}, target_rank)


# --- finding the adapter's tensors -----------------------------------------------------------------------


def _uncompiled(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, nn.Module) else model


def _tuned(host: AdapterHost, root: nn.Module) -> nn.Module:
    tuned = getattr(host, "tuned_model", None)
    return tuned() if tuned is not None else root


def _held_layers(tuned: nn.Module, name: str) -> tuple[dict[str, _Layer], list[str]]:
    """Every LoRA layer (PEFT's or fastadapter's: the same tree) holding adapter `name`, found by plan's
    walk, which does not enter the layers (named_modules would visit every adapter's modules); and the
    path of every module that walk met."""
    from ._inject import _walk
    from .layers import LoraLayer

    peft_layers = sys.modules.get("peft.tuners.lora")
    layer_types: tuple[type[Any], ...] = (LoraLayer,)
    if peft_layers is not None:
        layer_types = (*layer_types, peft_layers.LoraLayer)
    named, _, classes = _walk(tuned, layer_types)
    out: dict[str, _Layer] = {}
    for path, module in named:
        if type(module) not in classes:
            continue
        r = module.__dict__.get("r")
        if isinstance(r, dict) and name in r and isinstance(module.__dict__.get("scaling"), dict):
            out[path] = _Layer(path, module, dict(_live_slots(module, name)))
    return out, [path for path, _ in named]


def _live_slots(layer: nn.Module, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    modules: Any = layer._modules
    for field_name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        container = modules.get(field_name)
        entry = container._modules.get(name) if container is not None else None
        if entry is not None:
            for leaf, param in entry._parameters.items():
                if param is not None:
                    yield (
                        (
                            "lora_magnitude_vector"
                            if field_name == "lora_magnitude_vector"
                            else f"{field_name}.{leaf}"
                        ),
                        param,
                    )
    for field_name in ("lora_embedding_A", "lora_embedding_B"):
        container = modules.get(field_name)
        param = container._parameters.get(name) if container is not None else None
        if param is not None:
            yield field_name, param


# --- checks (nothing changes) -----------------------------------------------------------------------------


def check_compatible(old: Any, new: Any, where: str) -> None:
    for key in _SAME_SETTINGS:
        a, b = getattr(old, key, None), getattr(new, key, None)
        if a != b:
            raise ValueError(
                f"{where}: configs are incompatible for a hotswap: {key} is {b!r}, the model's {a!r}"
            )


def _match(
    tuned: nn.Module, layers: dict[str, _Layer], tensors: dict[str, torch.Tensor], name: str, where: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each file tensor matched to its layer and slot (`_Layer.incoming`) and checked; returns the base
    tensors the file also holds, as (model tensor, file tensor)."""
    others: list[tuple[torch.Tensor, torch.Tensor]] = []
    suffixes = slot_suffixes(name)
    for key, tensor in tensors.items():
        found = next(((key[: -len(s)], slot) for s, slot in suffixes.items() if key.endswith(s)), None)
        if found is None:
            # Not a LoRA weight: a base weight saved beside the adapter (embeddings with
            # save_embedding_layers), copied in place as a load copies it.
            existing = _resolve_model_tensor(tuned, key, {})
            if existing is None:
                raise TargetModuleError(f"{where}: tensor `{PEFT_PREFIX}{key}` names nothing in the model")
            check_shape(where, key, tensor.shape, tuple(existing.shape), "the model's tensor")
            others.append((existing, tensor))
            continue
        path, slot = found
        layer = layers.get(path)
        if layer is None or slot not in layer.live:
            raise TargetModuleError(
                f"{where}: tensor for `{path}` ({slot}): the model's adapter `{name}` has no such weight; "
                "a hotswap cannot add targets"
            )
        live = layer.live[slot]
        if not tensor.dtype.is_floating_point:
            raise TensorError(f"{where}: tensor `{key}` has dtype {tensor.dtype}, expected a float dtype")
        dim = _RANK_DIM.get(slot)
        fits = tensor.dim() == live.dim() and all(
            g == h if d != dim else g <= h
            for d, (g, h) in enumerate(zip(tensor.shape, live.shape, strict=False))
        )
        if not fits:
            extra = (
                " (a rank above the held one: prepare_for_hotswap(model, target_rank=...))"
                if (tensor.dim() == live.dim() and dim is not None and tensor.shape[dim] > live.shape[dim])
                else ""
            )
            raise TensorError(
                f"{where}: tensor `{key}` has shape {list(tensor.shape)}, the model's adapter `{name}` holds "
                f"{list(live.shape)} there{extra}"
            )
        layer.incoming[slot] = tensor
    for layer in layers.values():
        if layer.incoming and len(layer.incoming) != len(layer.live):
            missing = next(s for s in layer.live if s not in layer.incoming)
            raise MissingTensorError(f"{where}: no `{missing}` tensor for `{layer.path}`")
        if layer.incoming:
            a = "lora_A.weight" if "lora_A.weight" in layer.incoming else "lora_embedding_A"
            b = "lora_B.weight" if a == "lora_A.weight" else "lora_embedding_B"
            if layer.incoming[a].shape[0] != layer.incoming[b].shape[1]:
                raise TensorError(
                    f"{where}: `{layer.path}`: A has rank {layer.incoming[a].shape[0]}, B "
                    f"{layer.incoming[b].shape[1]}"
                )
    return others


def _config_rank(config: Any, path: str, default: int) -> int:
    rank_pattern = config.rank_pattern or {}
    key = pattern_key(rank_pattern, path)
    return int(rank_pattern.get(key, config.r)) if config.r is not None else default


def _check_config_rank(layer: _Layer, config: Any, where: str) -> float:
    """The layer's alpha from the file's config, after checking the config's rank is the file's."""
    if layer.incoming:
        rank = _rank(layer.incoming)
        if _config_rank(config, layer.path, rank) != rank:
            raise TensorError(
                f"{where}: `{layer.path}` has rank {rank} in the file, its config says "
                f"{_config_rank(config, layer.path, rank)}"
            )
    alpha_pattern = config.alpha_pattern or {}
    return alpha_pattern.get(pattern_key(alpha_pattern, layer.path), config.lora_alpha)  # type: ignore[no-any-return]


def _refuse_merged(layers: dict[str, _Layer], name: str) -> None:
    if any(name in getattr(layer.module, "merged_adapters", ()) for layer in layers.values()):
        raise ValueError(f"adapter {name!r} is merged into the base weights: unmerge it before a hotswap")


def _staged(layers: dict[str, _Layer]) -> dict[int, torch.Tensor]:
    """The file's tensors that must change device first (CUDA: through the pinned staging path), by id."""
    moves = [
        (src, live.device, src.dtype)
        for layer in layers.values()
        for slot, src in layer.incoming.items()
        if (live := layer.live[slot]).device != src.device
    ]
    return {id(src): moved for (src, _, _), moved in zip(moves, to_devices(moves), strict=True)}


# --- changes ---------------------------------------------------------------------------------------------


def _swap_layer(layer: _Layer, staged: dict[int, torch.Tensor], stored: dict[int, _Stored]) -> list[_Chunk]:
    """Copy the file's tensors into the layer's; those that can be read straight from the file into
    their place (CPU, same dtype, contiguous destination) are returned as reads for `read_chunks`
    instead: one copy from the page cache, no mapping to fault in."""
    if not layer.incoming:  # a layer the file does not target: PEFT zeroes it
        for live in layer.live.values():
            live.zero_()
        return []
    reads: list[_Chunk] = []
    for slot, src in layer.incoming.items():
        live = layer.live[slot]
        dim = _RANK_DIM.get(slot)
        r = src.shape[dim] if dim is not None else 0
        padded = dim is not None and r != live.shape[dim]
        target = live.narrow(dim, 0, r) if padded and dim is not None else live
        if padded and dim is not None:  # zero padding: only the extra rows / columns are zeroed
            live.narrow(dim, r, live.shape[dim] - r).zero_()
        record = stored.get(id(src))
        if (
            record is not None
            and target.device.type == "cpu"
            and target.dtype == src.dtype
            and target.is_contiguous()
        ):
            name, start, shape = record
            data = target.detach().view(-1).view(torch.uint8).numpy().data
            reads.append((name, data, start, src.dtype.itemsize, shape, [0] * len(shape), shape))
        else:
            target.copy_(staged.get(id(src), src))
    return reads


# (key, where the tensor starts in the file, its shape) / a read for `_core.read_chunks`
_Stored = tuple[str, int, list[int]]
_Chunk = tuple[str, memoryview, int, int, list[int], list[int], list[int]]


def _read(directory: str, name: str) -> tuple[Incoming, dict[int, _Stored]]:
    """The file's tensors for adapter `name` (`_read.read_weights`) and, for a safetensors file, where each
    is stored (by tensor id), for reads straight into the model's tensors. The reads take the bytes from
    the page cache directly, so the file is prefetched only when some of it is not there: then the disk
    reads start now, beside the checks, instead of after them."""
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        return read_weights(directory, name), {}
    file = SafetensorsFile(path)
    records = file.select(prefix=PEFT_PREFIX, renames=renames(name))
    _check_all_selected(path, len(records), len(file), lambda: (e[0] for e in file.entries()))
    tensors = mapped_tensors(file, records)
    stored = {id(tensors[key]): (key, start, shape) for key, _, shape, start, _ in records}
    file.prefetch(only_cold=True)
    return Incoming(path, tensors, file), stored


def _set_scaling(module: Any, name: str, alpha: float, rank: int, rslora: bool, set_alpha: bool) -> None:
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    current = module.scaling[name]
    if isinstance(current, torch.Tensor):
        current.fill_(scaling)  # in place: a compiled graph reads the same tensor
    else:
        module.scaling[name] = scaling
    if set_alpha:
        module.lora_alpha[name] = alpha


def _tensor_scaling(module: Any, name: str) -> None:
    value = module.scaling[name]
    if not isinstance(value, torch.Tensor):
        device = next((t.device for _, t in _live_slots(module, name)), None)
        module.scaling[name] = torch.tensor(float(value), device=device)


def _pad(layer: _Layer, rank: int) -> None:
    """Zero-pad the layer's A and B to `rank` (new parameters, same requires_grad: before compiling)."""
    for slot, live in list(layer.live.items()):
        dim = _RANK_DIM.get(slot)
        if dim is None or live.shape[dim] == rank:
            continue
        shape = list(live.shape)
        shape[dim] = rank
        padded = live.new_zeros(shape)
        padded.narrow(dim, 0, live.shape[dim]).copy_(live.detach())
        param = nn.Parameter(padded, requires_grad=live.requires_grad)
        modules: Any = layer.module._modules
        if slot in ("lora_embedding_A", "lora_embedding_B"):
            modules[slot]._parameters[_name_of(modules[slot]._parameters, live)] = param
        else:
            field_name, leaf = slot.split(".")
            linear = next(
                m
                for m in modules[field_name]._modules.values()
                if m is not None and m._parameters.get(leaf) is live
            )
            linear._parameters[leaf] = param
            if isinstance(linear, nn.Linear):
                linear.in_features, linear.out_features = param.shape[1], param.shape[0]
        layer.live[slot] = param


def _name_of(params: dict[str, Any], tensor: torch.Tensor) -> str:
    return next(k for k, v in params.items() if v is tensor)


def _held_config(config: Any, held: dict[str, tuple[int, int, float]]) -> Any:
    """`config` as it must read for weights held at rank R where the adapter's rank is r (path -> (R, r,
    alpha)): rank R, alpha scaled so each layer keeps its scaling. `config` itself when nothing is padded."""
    if all(big == small for big, small, _ in held.values()):
        return config
    import copy

    out = copy.copy(config) if type(config).__name__ == "AdapterConfig" else copy.deepcopy(config)
    ranks = {p: big for p, (big, _, _) in held.items()}
    alphas = {
        p: alpha * (math.sqrt(big / small) if config.use_rslora else big / small)
        for p, (big, small, alpha) in held.items()
    }
    out.r = Counter(ranks.values()).most_common(1)[0][0]
    out.lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    out.rank_pattern = {re.escape(p): r for p, r in ranks.items() if r != out.r}
    out.alpha_pattern = {re.escape(p): a for p, a in alphas.items() if a != out.lora_alpha}
    return out


def _replace_config(old: Any, new: Any) -> None:
    """The held config object takes `new`'s fields: the same object, so whatever holds it (and a compiled
    graph's guards on it) sees the swap."""
    if new is old:
        return
    fields = vars(old)
    fields.clear()
    fields.update(vars(new))
