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
from collections import Counter, OrderedDict
from typing import Any, Literal

import torch
from torch import nn

from ._config import own_copy
from ._core import SafetensorsFile, map_file_over
from ._device_load import to_devices
from ._inject import pattern_key
from ._read import Incoming, read_weights, select_records
from ._swap_plan import (
    RANK_DIM,
    Layer,
    Plan,
    Record,
    cached_plan,
    held_layers,
    layers_holding,
    live_slots,
    plan,
)
from .errors import TensorError
from .hosts import AdapterHost, host_for
from .names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_ADAPTER

# What must match between the adapter held and the file: settings the forward reads besides the
# weights and the scaling (PEFT's CONFIG_KEYS_TO_CHECK, less alpha_pattern: scaling is per layer here).
_SAME_SETTINGS = ("peft_type", "use_rslora", "lora_dropout", "use_dora")
_HUB_ONLY = ("revision", "cache_dir", "token", "use_auth_token", "local_files_only")


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
    new = _new_config(host, directory, is_trainable=not old.inference_mode)
    check_compatible(old, new, directory)
    tuned = _tuned(host, root)
    swap, incoming = _kept_or_open(tuned, adapter_name, old, directory)
    try:
        if swap is None:
            peft_names = frozenset(host.configs()) if as_peft else None
            records = _records(incoming, adapter_name)
            found = layers_holding(tuned, adapter_name)
            swap = plan(tuned, found, adapter_name, incoming, records, old, peft_names)
        if as_peft:
            swap.refuse_unlike_peft(host.configs(), adapter_name, incoming.where)
        alphas = _alphas(new, swap.targeted, incoming.where)
        swap.refuse_merged(adapter_name, as_peft)
        staged = _staged(swap.copies)  # device copies may fail (memory): still before any change
        _change(swap, incoming, staged)
        for layer_path, (module, rank) in swap.targeted.items():
            _set_scaling(module, adapter_name, alphas[layer_path], rank, new.use_rslora, not as_peft)
        if not as_peft:
            held = {p: (swap.held[p], rank, alphas[p]) for p, (_, rank) in swap.targeted.items()}
            _replace_config(old, _held_config(new, held))
    finally:
        incoming.done()


def _new_config(host: AdapterHost, directory: str, *, is_trainable: bool) -> Any:
    """The host's config for the adapter in `directory`, built once per content of its config file: a
    server swaps the same few adapters back and forth, and reading the bytes costs less than parsing and
    building the config again. Each call gets a copy of its own (the swap hands its fields to the
    adapter's config)."""
    try:
        with open(os.path.join(directory, ADAPTER_CONFIG), "rb") as f:
            raw = f.read()
    except OSError:
        return host.new_config(directory, is_trainable=is_trainable)  # its errors name the problem
    key = (type(host), raw, is_trainable)
    built = _CONFIGS.get(key)
    if built is None:
        built = host.new_config(directory, is_trainable=is_trainable)
        _CONFIGS[key] = built
        while len(_CONFIGS) > _CONFIGS_KEPT:
            _CONFIGS.popitem(last=False)
    else:
        _CONFIGS.move_to_end(key)
    return own_copy(built)


# (host type, adapter_config.json's bytes, is_trainable) -> the config built from them, latest used last.
_CONFIGS: OrderedDict[tuple[type, bytes, bool], Any] = OrderedDict()
_CONFIGS_KEPT = 64


def _kept_or_open(tuned: nn.Module, name: str, config: Any, directory: str) -> tuple[Plan | None, Incoming]:
    """The plan kept from the last swap when it holds for the model and for the file (laid out as the one
    it was made for: its checks hold, nothing to parse or select), with the file unopened; otherwise no
    plan, and the file opened (`_open`)."""
    kept = cached_plan(tuned, name, config)
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if kept is not None and _stored(path) == kept.stored:
        return kept, Incoming(path, {}, None)
    return None, _open(directory, name)


def _change(swap: Plan, incoming: Incoming, staged: dict[int, torch.Tensor]) -> None:
    """The swap's one change to the weights. Weights that are views of the file they were loaded from,
    each where the new file has its own, get the new file mapped over the old one, in place (same
    addresses, no byte copied; a cold file's reads, begun in `_open` beside the checks, go on into the
    weights' own mapping). Others are written: the disk reads end first, so the copies come from the page
    cache (pread beside them fought them for the disk: 3.5x the read, not 1.2x), and a read that failed
    (the file cut short under us) is raised before anything changes."""
    mapping = swap.held_mapping()
    if mapping is not None and incoming.mapped is None and swap.stored is not None:
        map_file_over(incoming.where, swap.stored[0], mapping)
    elif mapping is not None and incoming.mapped is not None and _same_length(mapping, incoming.mapped):
        incoming.mapped.map_over(mapping)
    else:
        incoming.ready()
        _write(swap, incoming.where, staged)


def _write(swap: Plan, where: str, staged: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for t in swap.zeros:
            t.zero_()
        if swap.reads:
            # The weights are usually views of the private mapping of the file they were loaded from:
            # writing them page by page would copy each page first (copy-on-write).
            swap.reads.read(where, replace_pages=not swap.written)
            swap.written = True
        for existing, value in swap.copies:
            existing.copy_(staged.get(id(value), value))


def _same_length(a: SafetensorsFile, b: SafetensorsFile) -> bool:
    return memoryview(a).nbytes == memoryview(b).nbytes


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
    per_adapter = {name: held_layers(tuned, name) for name in configs}
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
    # torch.compile's OptimizedModule holds the model as its submodule `_orig_mod`. Asked of `_modules`:
    # getattr on a PeftModel tries every wrapped model's __getattr__ before it fails.
    inner = model._modules.get("_orig_mod")
    return inner if isinstance(inner, nn.Module) else model


def _tuned(host: AdapterHost, root: nn.Module) -> nn.Module:
    tuned = getattr(host, "tuned_model", None)
    return tuned() if tuned is not None else root


# --- checks (nothing changes) -----------------------------------------------------------------------------


def check_compatible(old: Any, new: Any, where: str) -> None:
    for key in _SAME_SETTINGS:
        a, b = getattr(old, key, None), getattr(new, key, None)
        if a != b:
            raise ValueError(
                f"{where}: configs are incompatible for a hotswap: {key} is {b!r}, the model's {a!r}"
            )


def _config_rank(config: Any, path: str, default: int) -> int:
    rank_pattern = config.rank_pattern or {}
    key = pattern_key(rank_pattern, path)
    return int(rank_pattern.get(key, config.r)) if config.r is not None else default


def _alphas(config: Any, targeted: dict[str, tuple[Any, int]], where: str) -> dict[str, float]:
    """Each targeted layer's alpha from the file's config, after checking the config's rank is the
    file's (path -> (layer, the file's rank))."""
    r, alpha = config.r, config.lora_alpha
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    out = {}
    for path, (_, rank) in targeted.items():
        said = rank if r is None else int(rank_pattern.get(pattern_key(rank_pattern, path), r))
        if said != rank:
            raise TensorError(f"{where}: `{path}` has rank {rank} in the file, its config says {said}")
        out[path] = alpha_pattern.get(pattern_key(alpha_pattern, path), alpha) if alpha_pattern else alpha
    return out


def _staged(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """The file's tensors that must change device first (CUDA: through the pinned staging path), by id."""
    moves = [(src, live.device, src.dtype) for live, src in copies if live.device != src.device]
    return {id(src): moved for (src, _, _), moved in zip(moves, to_devices(moves), strict=True)}


# --- changes ---------------------------------------------------------------------------------------------


def _open(directory: str, name: str) -> Incoming:
    """The adapter file: for a safetensors file its mapping only (a plan made before may hold for it:
    `_records` selects its tensors otherwise, and a new plan makes them views of the mapping). The swap
    reads the bytes from the page cache directly, so the file is prefetched only when some of it is
    not there: then the disk reads start now, beside the checks, instead of after them."""
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        return read_weights(directory, name)
    file = SafetensorsFile(path)
    file.prefetch(only_cold=True)
    return Incoming(path, {}, file)


def _stored(path: str) -> tuple[bytes, int] | None:
    """The header (8-byte length and JSON) and length of the safetensors file at `path`, read without
    parsing; None when there is no such file or it is too short to have them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8 or 8 + int.from_bytes(prefix, "little") > size:
            return None
        return prefix + os.pread(fd, int.from_bytes(prefix, "little"), 8), size
    finally:
        os.close(fd)


def _records(incoming: Incoming, name: str) -> list[Record] | None:
    """The safetensors file's tensors for adapter `name`, each key as the model holds it (None for a
    `.bin` file, whose tensors `_open` read)."""
    return None if incoming.mapped is None else select_records(incoming.mapped, name)


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
        device = next((t.device for _, t in live_slots(module, name)), None)
        module.scaling[name] = torch.tensor(float(value), device=device)


def _pad(layer: Layer, rank: int) -> None:
    """Zero-pad the layer's A and B to `rank` (new parameters, same requires_grad: before compiling)."""
    for slot, live in list(layer.live.items()):
        dim = RANK_DIM.get(slot)
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
    out = own_copy(config)
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
