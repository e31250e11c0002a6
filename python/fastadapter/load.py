"""`fastadapter.load` and adapter management: LoRA on plain torch / transformers models, no peft needed.

PEFT's `from_pretrained` creates every LoRA layer with random weights, overwrites them with the loaded ones
and casts dtypes back and forth. Here the file is mapped once (copy-on-write: writing to a loaded weight
never reaches the file), the Rust core selects and renames the adapter's keys from the header alone, and
each LoRA parameter is built directly on its view of the mapping; a tensor is copied only when it must
change device or dtype (PEFT's policy: the base layer's device, fp16/bf16 adapters upcast to fp32).
Weights bound for a GPU go there in a few large copies per device (`_device_load`), not one per tensor.

Everything is checked before the model is touched (config, files, targets, every tensor's name and shape),
so a failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._config import STATE_ATTR, AdapterConfig, AdapterState, adapter_state, config_from_object, read_config
from ._core import SafetensorsFile, select_keys
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    MissingTensorError,
    TargetModuleError,
    TensorError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ._device_load import to_devices
    from ._inject import (
        Plan,
        Target,
        adapter_dtype,
        add_fresh,
        add_loaded,
        base_device,
        install,
        plan,
        wrap,
        wrap_modules_to_save,
    )
    from ._tensors import mapped_tensors
    from .layers import LoraLayer, ModulesToSave


def _import_torch() -> None:
    """Bind torch and the torch-side modules on first use: `import fastadapter` must not import torch."""
    if "torch" in globals():
        return
    import importlib

    import torch
    from torch import nn

    injection = importlib.import_module("._inject", __package__)
    layers = importlib.import_module(".layers", __package__)
    _tensors = importlib.import_module("._tensors", __package__)
    device_load = importlib.import_module("._device_load", __package__)

    names = ("Plan", "Target", "adapter_dtype", "add_fresh", "add_loaded", "base_device", "install", "plan")
    globals().update({n: getattr(injection, n) for n in (*names, "wrap", "wrap_modules_to_save")})
    globals().update(
        torch=torch,
        nn=nn,
        mapped_tensors=_tensors.mapped_tensors,
        to_devices=device_load.to_devices,
        LoraLayer=layers.LoraLayer,
        ModulesToSave=layers.ModulesToSave,
    )


__all__ = ["active_adapters", "delete_adapter", "inject", "load", "merge_and_unload", "set_adapter", "unload"]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Where each LoRA tensor goes, keyed by the suffix it has once renamed (see `_renames`).
_LINEAR_SLOTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")
_EMBEDDING_SLOTS = ("lora_embedding_A", "lora_embedding_B")


def _is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# --- reading the weights ---------------------------------------------------------------------------------


def _slot_suffixes(name: str) -> dict[str, str]:
    """renamed-key suffix -> slot, for adapter `name`."""
    return {
        f".lora_A.{name}.weight": "lora_A.weight",
        f".lora_B.{name}.weight": "lora_B.weight",
        f".lora_B.{name}.bias": "lora_B.bias",
        f".lora_magnitude_vector.{name}.weight": "lora_magnitude_vector",
        f".lora_embedding_A.{name}": "lora_embedding_A",
        f".lora_embedding_B.{name}": "lora_embedding_B",
    }


def _renames(name: str) -> list[tuple[str, str]]:
    """PEFT's file keys -> module-tree keys (peft's `_insert_adapter_name_into_state_dict`), applied by the
    Rust core's key selector, for both file formats: `base_model.model.x.lora_A.weight` ->
    `x.lora_A.<name>.weight`."""
    n = name.replace("$", "$$")  # a literal `$` in a regex replacement
    return [
        (r"^base_model\.model\.", ""),
        (r"\.(lora_A|lora_B)\.(weight|bias)$", f".${{1}}.{n}.${{2}}"),
        (r"\.(lora_embedding_A|lora_embedding_B)$", f".${{1}}.{n}"),
        (r"\.lora_magnitude_vector$", f".lora_magnitude_vector.{n}.weight"),
    ]


def read_bin(path: str) -> dict[str, torch.Tensor]:
    """`adapter_model.bin` through torch's safe unpickler, memory-mapped. The seam for the Rust reader."""
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise TensorError(f"{path}: expected a dict of tensors")
    return loaded


def _check_all_selected(path: str, selected: int, total: int, keys: Callable[[], Iterable[str]]) -> None:
    """Every one of the file's `total` tensors was selected; `keys` lists them only to name a stray one."""
    if selected != total:
        stray = next(k for k in keys() if not k.startswith(PEFT_PREFIX))
        raise TargetModuleError(
            f"{path}: tensor `{stray}` is not under `{PEFT_PREFIX}` (not a PEFT adapter key)"
        )


def read_weights(adapter_dir: str, name: str) -> tuple[str, dict[str, torch.Tensor], SafetensorsFile | None]:
    """(path, {module-tree key: tensor}, mapped file); safetensors tensors are views of one private mapping
    whose pages a background thread maps in while the caller builds the layers (on another core), until
    the caller calls `stop_prefetch()` on the file: every page it reached costs no fault later."""
    path = os.path.join(adapter_dir, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(path):
        file = SafetensorsFile(path)
        records = file.select(prefix=PEFT_PREFIX, renames=_renames(name))
        _check_all_selected(path, len(records), len(file), lambda: (e[0] for e in file.entries()))
        file.prefetch()
        return path, mapped_tensors(file, records), file
    bin_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if os.path.isfile(bin_path):
        loaded = read_bin(bin_path)
        pairs = select_keys(list(loaded), prefix=PEFT_PREFIX, renames=_renames(name))
        _check_all_selected(bin_path, len(pairs), len(loaded), lambda: loaded)
        return bin_path, {new: loaded[old] for old, new in pairs}, None
    raise FileNotFoundError(
        2, f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in the adapter directory", path
    )


# --- checking the tensors against the plan ---------------------------------------------------------------


@dataclass
class Assignment:
    lora: dict[str, dict[str, torch.Tensor]]  # target path -> slot -> tensor (converted, ready)
    copies: dict[str, nn.Module]  # modules_to_save path -> filled copy
    others: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # (model tensor, value) copied in place (biases, embeddings)


def _expected_shapes(t: Target, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    in_f, out_f = t.in_out
    if t.kind == "embedding":
        return {"lora_embedding_A": (t.r, in_f), "lora_embedding_B": (out_f, t.r)}
    shapes: dict[str, tuple[int, ...]] = {"lora_A.weight": (t.r, in_f), "lora_B.weight": (out_f, t.r)}
    if config.lora_bias:
        shapes["lora_B.bias"] = (out_f,)
    if config.use_dora:
        shapes["lora_magnitude_vector"] = (out_f,)
    return shapes


def _check_shape(where: str, key: str, got: torch.Size, expected: tuple[int, ...], base: str) -> None:
    if tuple(got) != tuple(expected):
        raise TensorError(f"{where}: tensor `{key}` has shape {list(got)}, but {base} needs {list(expected)}")


def _resolve_model_tensor(model: nn.Module, key: str, targets: dict[str, Target]) -> torch.Tensor | None:
    """The model parameter or buffer a non-LoRA key of the file names (biases with bias="all"/"lora_only",
    embedding weights saved with save_embedding_layers), `<target>.base_layer.x` included."""
    mod_path, _, leaf = key.rpartition(".")
    if mod_path.endswith(".base_layer") or mod_path == "base_layer":
        owner = mod_path[: -len("base_layer")].rstrip(".")
        if owner in targets:
            module: nn.Module | None = targets[owner].base
        else:
            try:
                found = model.get_submodule(owner) if owner else model
            except AttributeError:
                return None
            module = found.base_layer if isinstance(found, LoraLayer) else None
    else:
        try:
            module = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            return None
    if module is None:
        return None
    tensor: torch.Tensor | None = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    return tensor


def _assign(
    model: nn.Module,
    p: Plan,
    name: str,
    where: str,
    tensors: dict[str, torch.Tensor],
    *,
    trainable: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Assignment:
    config = p.config
    targets = {t.path: t for t in p.targets}
    suffixes = _slot_suffixes(name)
    save_paths = {path: module for path, _, _, module in p.save_targets}
    lora: dict[str, dict[str, torch.Tensor]] = {t.path: {} for t in p.targets}
    save_values: dict[str, dict[str, torch.Tensor]] = {path: {} for path in save_paths}
    others: list[tuple[torch.Tensor, torch.Tensor]] = []

    # Per target, computed on first use: this loop runs once per tensor, thousands of times.
    expected_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in tensors.items():
        slot = None
        for suffix, s in suffixes.items():
            if key.endswith(suffix):
                slot, path = s, key[: -len(suffix)]
                break
        if slot is not None:
            target = targets.get(path)
            if target is None:
                raise TargetModuleError(
                    f"{where}: tensor `{PEFT_PREFIX}{path}...{slot}` is for module `{path}`, which "
                    + (
                        "is not in the model"
                        if not _has_module(model, path)
                        else "the config does not target"
                    )
                )
            expected = expected_shapes.get(path)
            if expected is None:
                expected = expected_shapes[path] = _expected_shapes(target, config)
            if slot not in expected:
                raise TargetModuleError(
                    f"{where}: tensor `{key}` does not fit `{path}` ({type(target.base).__name__}) "
                    "with this config"
                )
            if tensor.shape != expected[slot]:  # torch.Size is a tuple: the message is built only if needed
                _check_shape(
                    where, key, tensor.shape, expected[slot], f"`{path}` ({_describe(target)}, r={target.r})"
                )
            if not tensor.dtype.is_floating_point:
                raise TensorError(f"{where}: tensor `{key}` has dtype {tensor.dtype}, expected a float dtype")
            lora[path][slot] = tensor
            continue
        owner = next((sp for sp in save_paths if key.startswith(sp + ".")), None)
        if owner is not None:
            save_values[owner][key[len(owner) + 1 :]] = tensor
            continue
        existing = _resolve_model_tensor(model, key, targets)
        if existing is None:
            raise TargetModuleError(f"{where}: tensor `{PEFT_PREFIX}{key}` names nothing in the model")
        _check_shape(where, key, tensor.shape, tuple(existing.shape), "the model's tensor")
        others.append((existing, tensor))

    for t in p.targets:
        got = lora[t.path]
        expected = expected_shapes.get(t.path) or _expected_shapes(t, config)
        if len(got) != len(expected):  # every slot in `got` was checked to be in `expected`
            missing = next(s for s in expected if s not in got)
            raise MissingTensorError(f"{where}: no `{missing}` tensor for targeted module `{t.path}`")

    # Conversions (device, dtype) before anything is changed: they may fail (e.g. out of memory).
    # All at once, so that the weights for each GPU go in a few large copies.
    slots = [(t.path, slot) for t in p.targets for slot in lora[t.path]]
    requests: list[tuple[torch.Tensor, torch.device, torch.dtype]] = []
    for t in p.targets:
        placement = (base_device(t.base, device), adapter_dtype(t.base, dtype))
        requests.extend((v, *placement) for v in lora[t.path].values())
    ready: dict[str, dict[str, torch.Tensor]] = {t.path: {} for t in p.targets}
    for (path, slot), v in zip(slots, to_devices(requests), strict=True):
        ready[path][slot] = nn.Parameter(v, requires_grad=trainable)
    copies = {
        path: _filled_copy(module, save_values[path], where, path, trainable)
        for path, module in save_paths.items()
    }
    return Assignment(ready, copies, others)


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if t.device == device and t.dtype == dtype:
        return t  # the zero-copy case: a view of the mapping
    return t.to(device=device, dtype=dtype)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _describe(t: Target) -> str:
    in_f, out_f = t.in_out
    if t.kind == "embedding":
        return f"Embedding({in_f}, {out_f})"
    return f"{'Conv1D' if t.kind == 'conv1d' else 'Linear'}(in={in_f}, out={out_f})"


def _filled_copy(
    original: nn.Module, values: dict[str, torch.Tensor], where: str, path: str, trainable: bool
) -> nn.Module:
    """modules_to_save: the adapter's own copy of `original`, its tensors taken from the file."""
    source = original.original_module if isinstance(original, ModulesToSave) else original
    expected = source.state_dict(keep_vars=True)
    for key in values:
        if key not in expected:
            raise TargetModuleError(f"{where}: tensor `{PEFT_PREFIX}{path}.{key}` names nothing in `{path}`")
        _check_shape(where, f"{path}.{key}", values[key].shape, tuple(expected[key].shape), f"`{path}`")
    copy = ModulesToSave.empty_copy(source)
    for pname, _ in list(copy.named_parameters(remove_duplicate=False)):
        owner_path, _, leaf = pname.rpartition(".")
        owner = copy.get_submodule(owner_path) if owner_path else copy
        original_param = expected[pname]
        value = values.get(pname)
        data = (
            original_param.detach().clone()
            if value is None
            else _to(value, original_param.device, original_param.dtype)
        )
        owner._parameters[leaf] = nn.Parameter(data, requires_grad=trainable)
    for bname, buf in copy.named_buffers():
        if bname in values:
            owner_path, _, leaf = bname.rpartition(".")
            owner = copy.get_submodule(owner_path) if owner_path else copy
            owner._buffers[leaf] = _to(values[bname], buf.device, buf.dtype).clone()
    return copy


# --- public API ------------------------------------------------------------------------------------------


_F = TypeVar("_F", bound=Callable[..., Any])


def _gc_paused(fn: _F) -> _F:
    """Run `fn` with Python's cyclic garbage collector paused, and hand what it built to the collector's
    oldest generation.

    Building thousands of modules (each with a dozen hook containers) triggers collections that walk
    the whole model: measured on 1024 LoRA layers, a load took 62-67 ms with the collector paused and
    67-342 ms (at random) without. Paused, the debt is still there: the ~80,000 new container objects
    sit in the youngest generation, and the first allocation after the load pays a 16 ms collection of
    them. They are the model's new layers, alive as long as the model, so a young-generation scan can
    only promote them. `gc.freeze()` + `gc.unfreeze()` does that promotion directly (documented: frozen
    objects go back to the oldest generation) in microseconds. Two guards keep it from touching
    anything else: the young generations are collected first (`gc.collect(1)`, the collection they were
    due anyway, well under a millisecond), so the user's young garbage is not promoted with ours; and
    it is skipped if the process has frozen objects of its own (a pre-fork server), which unfreeze
    would release. Nothing is leaked: reference counting frees as usual, and the oldest generation is
    still collected."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        promote = was_enabled and gc.get_freeze_count() == 0
        if promote:
            gc.collect(1)
        gc.disable()
        try:
            result = fn(*args, **kwargs)
            if promote:
                gc.freeze()
                gc.unfreeze()
            return result
        finally:
            if was_enabled:
                gc.enable()

    return cast(_F, wrapper)


@_gc_paused
def load(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load the LoRA adapter saved in `adapter_dir` (by PEFT or fastadapter) into `model`, activate it, and
    return the model.

    `model` is a plain torch / transformers model (LoRA layers are injected; call again with another
    `adapter_name` to add a second adapter), or a `peft.PeftModel` (the adapter is added to PEFT's own
    layers). Each LoRA weight goes to its base layer's device (or `device`) with PEFT's dtype policy (the
    base layer's dtype, fp16/bf16 upcast to fp32; or `dtype`). fp32 weights on an fp32 or half-precision
    CPU base stay views of the file's private mapping. `is_trainable=False` freezes the adapter, as PEFT.
    """
    _import_torch()
    adapter_dir = os.fspath(adapter_dir)
    if _is_peft_model(model):
        _load_into_peft(
            model, adapter_dir, adapter_name, is_trainable=is_trainable, device=device, dtype=dtype
        )
        return model
    state = adapter_state(model)
    if state is not None and adapter_name in state.configs:
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}")
    config = read_config(adapter_dir)
    config.inference_mode = not is_trainable
    where, tensors, mapped = read_weights(adapter_dir, adapter_name)
    p = plan(model, config, adapter_name)
    assignment = _assign(
        model, p, adapter_name, where, tensors, trainable=is_trainable, device=device, dtype=dtype
    )
    # Nothing above changed the model; from here on, nothing can fail for a reason the checks did not see.
    _freeze_base(model, p)
    layers = []
    for t in p.targets:
        layer = wrap(t)
        add_loaded(layer, t, adapter_name, config, assignment.lora[t.path])  # type: ignore[arg-type]
        install(t, layer)
        layers.append(layer)
    with torch.no_grad():
        for existing, value in assignment.others:
            existing.copy_(value)
    wrap_modules_to_save(p.save_targets, adapter_name, assignment.copies)
    only_layers = layers if p.first_injection and not p.save_targets else None
    _register(model, adapter_name, config, only_layers)
    if mapped is not None:
        mapped.stop_prefetch()
    return model


@_gc_paused
def inject(
    model: nn.Module,
    config: Any,
    adapter_name: str = "default",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Add a new LoRA adapter described by `config` (a peft `LoraConfig` or a dict of its fields), with
    PEFT's initialisation (`init_lora_weights` True: kaiming-uniform A and zero B; "gaussian"; False:
    random A and B), trainable unless `config.inference_mode`; activate it and return the model."""
    _import_torch()
    if _is_peft_model(model):
        raise TypeError("inject expects a plain model; for a PeftModel use its own add_adapter")
    state = adapter_state(model)
    if state is not None and adapter_name in state.configs:
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}")
    cfg = config_from_object(config)
    _add_task_heads(cfg)
    p = plan(model, cfg, adapter_name)
    trainable = not cfg.inference_mode
    layers = [(t, wrap(t)) for t in p.targets]
    for t, layer in layers:  # creates the tensors (PEFT's random stream); the model is not touched yet
        add_fresh(layer, t, adapter_name, cfg, device, dtype)
    copies = {path: _fresh_copy(module, trainable) for path, _, _, module in p.save_targets}
    _freeze_base(model, p)
    for t, layer in layers:
        for param in layer.adapter_parameters(adapter_name):
            param.requires_grad_(trainable)
        install(t, layer)
    wrap_modules_to_save(p.save_targets, adapter_name, copies)
    _register(model, adapter_name, cfg)
    return model


def _fresh_copy(module: nn.Module, trainable: bool) -> nn.Module:
    import copy

    source = module.original_module if isinstance(module, ModulesToSave) else module
    out = copy.deepcopy(source)
    out.requires_grad_(trainable)
    return out


def _add_task_heads(config: AdapterConfig) -> None:
    # PeftModelForSequenceClassification / ForTokenClassification add the classifier heads.
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        heads = ["classifier", "score"]
        config.modules_to_save = (
            heads if config.modules_to_save is None else [*config.modules_to_save, *heads]
        )


def _freeze_base(model: nn.Module, p: Plan) -> None:
    # PEFT freezes the base model on the first injection; later ones keep existing trainability.
    if p.first_injection:
        # The modules planning listed: the model has not changed since (nothing is installed before this).
        for module in p.modules:
            for param in module._parameters.values():
                if param is not None and param.requires_grad:
                    param.requires_grad_(False)


def _register(
    model: nn.Module, name: str, config: AdapterConfig, only_layers: list[LoraLayer] | None = None
) -> None:
    """Record adapter `name` on the model and activate it. `only_layers`: the caller just built these and
    they are all the adapter layers the model has (first injection, no modules_to_save), with the
    trainability `set_adapter` would give them (`requires_grad=not inference_mode`); activating the
    adapter is then setting each one's active list, without `set_adapter`'s walk over every layer and
    parameter (~5 ms on 1024 layers)."""
    state = adapter_state(model)
    if state is None:
        state = AdapterState()
        model.__dict__[STATE_ATTR] = state
    state.configs[name] = config
    if only_layers is None or len(state.configs) != 1:
        set_adapter(model, name)
        return
    for layer in only_layers:
        layer.__dict__["active_adapters"] = [name]
    state.active = [name]
    _set_bias_trainability(model, state)


def _walk_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """LoRA layers and modules_to_save wrappers, not descending into them."""
    out: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, (LoraLayer, ModulesToSave)):
            out.append((path, module))
            continue
        for child_name, child in reversed(list(module._modules.items())):
            if child is not None:
                stack.append((f"{path}.{child_name}" if path else child_name, child))
    return out


def _require_state(model: nn.Module) -> AdapterState:
    if _is_peft_model(model):
        raise TypeError("this function is for models injected by fastadapter; use the PeftModel's own method")
    state = adapter_state(model)
    if state is None:
        raise AdapterNotFoundError(f"{type(model).__name__} has no fastadapter adapter")
    return state


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (PEFT: `model.active_adapters`)."""
    _import_torch()
    if _is_peft_model(model):
        peft_model: Any = model
        return list(peft_model.active_adapters)
    state = adapter_state(model)
    return [] if state is None else list(state.active)


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make `name` (or several names: their outputs add up, as in PEFT) the active adapter(s); active
    adapters are trainable unless loaded for inference, inactive ones are frozen (PEFT's rule)."""
    _import_torch()
    if _is_peft_model(model):
        assert isinstance(name, str)
        peft_model: Any = model
        peft_model.set_adapter(name)
        return
    state = _require_state(model)
    names = [name] if isinstance(name, str) else list(name)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise AdapterNotFoundError(f"unknown adapter(s) {unknown}; the model has {list(state.configs)}")
    trainable_by_adapter = {a: a in names and not c.inference_mode for a, c in state.configs.items()}
    for path, module in _walk_layers(model):
        if isinstance(module, LoraLayer):
            # A plain attribute: straight into __dict__, past nn.Module.__setattr__ (thousands of layers).
            module.__dict__["active_adapters"] = list(names)
            for adapter in module.r:
                trainable = trainable_by_adapter[adapter]
                for param in module.adapter_parameters(adapter):
                    if param.requires_grad != trainable:
                        param.requires_grad_(trainable)
        else:
            assert isinstance(module, ModulesToSave)
            present = [n for n in names if n in module.modules_to_save._modules]
            if len(present) > 1:
                raise ValueError(
                    f"only one adapter with modules_to_save can be active at `{path}`, got {present}"
                )
            module.active_adapter = present[0] if present else None
            for adapter, copy in module.modules_to_save.items():
                copy.requires_grad_(adapter in present and not state.configs[adapter].inference_mode)
    state.active = names
    _set_bias_trainability(model, state)


def _set_bias_trainability(model: nn.Module, state: AdapterState) -> None:
    for adapter in state.active:
        config = state.configs[adapter]
        if config.inference_mode or config.bias == "none":
            continue
        if config.bias == "all":
            for pname, param in model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    param.requires_grad_(True)
        else:
            for module in model.modules():
                if isinstance(module, LoraLayer) and module.bias is not None:
                    module.bias.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`. When it was active, the remaining active ones stay (or the first remaining
    adapter becomes active, as in PEFT); when it was the last adapter, the model is unloaded."""
    _import_torch()
    if _is_peft_model(model):
        peft_model: Any = model
        peft_model.delete_adapter(name)
        return
    state = _require_state(model)
    if name not in state.configs:
        raise AdapterNotFoundError(f"unknown adapter {name!r}; the model has {list(state.configs)}")
    del state.configs[name]
    if not state.configs:
        unload(model)
        return
    for _, module in _walk_layers(model):
        if isinstance(module, LoraLayer):
            module.delete_adapter(name)
        elif isinstance(module, ModulesToSave) and name in module.modules_to_save._modules:
            del module.modules_to_save[name]
    remaining = [a for a in state.active if a != name] or [sorted(state.configs)[0]]
    set_adapter(model, remaining)


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge the active adapters (or `adapter_names`) into the base weights and remove every LoRA layer, as
    PEFT's `merge_and_unload`; returns the base model (the same object for a plain model)."""
    _import_torch()
    if _is_peft_model(model):
        peft_model: Any = model
        merged: nn.Module = peft_model.merge_and_unload(adapter_names=adapter_names)
        return merged
    return _unload(model, merge=True, adapter_names=adapter_names)


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer without merging; returns the base model."""
    _import_torch()
    if _is_peft_model(model):
        peft_model: Any = model
        base: nn.Module = peft_model.unload()
        return base
    return _unload(model, merge=False, adapter_names=None)


def _unload(model: nn.Module, merge: bool, adapter_names: Sequence[str] | None) -> nn.Module:
    state = _require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    for path, module in _walk_layers(model):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(module, LoraLayer):
            if merge:
                module.merge([n for n in names if n in module.r])
            replacement = module.base_layer
        else:
            assert isinstance(module, ModulesToSave)
            active = module.active_adapter
            replacement = module.modules_to_save[active] if active is not None else module.original_module
        parent._modules[child] = replacement
    del model.__dict__[STATE_ATTR]
    return model


# --- PeftModel ---------------------------------------------------------------------------------------------


def _load_into_peft(
    model: Any,
    adapter_dir: str,
    name: str,
    *,
    is_trainable: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Add an adapter to a PeftModel through PEFT's own machinery, without its random init: PEFT builds the
    layers on the meta device (`add_adapter(low_cpu_mem_usage=True)`), then the loaded tensors (views of
    the mapping where no conversion is needed) are assigned. On any failure the new adapter is deleted."""
    from peft import LoraConfig
    from peft.utils.other import AuxiliaryTrainingWrapper

    if name in model.peft_config:
        raise AdapterExistsError(f"the model already has an adapter named {name!r}")
    read_config(adapter_dir)  # fastadapter's checks: anything it cannot load faithfully is refused here
    peft_config = LoraConfig.from_pretrained(adapter_dir)
    peft_config.inference_mode = not is_trainable
    where, tensors, mapped = read_weights(adapter_dir, name)
    model.add_adapter(name, peft_config, low_cpu_mem_usage=True)
    try:
        # modules_to_save copies: saved as `<path>.<key>`, held as `<path>.modules_to_save.<name>.<key>`.
        aux: dict[str, str] = {}
        for path, module in model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                for saved, held in module.adapter_state_dict_load_map(name).items():  # type: ignore[no-untyped-call]
                    aux[f"{path}.{saved}"] = f"{path}.{held}"
        state = model.state_dict(keep_vars=True)
        keys: list[str] = []
        requests: list[tuple[torch.Tensor, torch.device, torch.dtype]] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, tensor in tensors.items():
            full = aux.get(PEFT_PREFIX + key, PEFT_PREFIX + key)
            existing = state.get(full)
            if existing is None:
                raise TargetModuleError(f"{where}: tensor `{full}` names nothing in the model")
            _check_shape(where, full, tensor.shape, tuple(existing.shape), "the model's layer")
            if existing.device.type == "meta":
                layer = model.get_submodule(full.split(f".{name}", 1)[0].rpartition(".")[0])
                base = layer.get_base_layer()
                keys.append(full)
                requests.append((tensor, base_device(base, device), adapter_dtype(base, dtype)))
            else:
                copies.append((existing, tensor))
        requested = set(keys)
        for key, existing in state.items():
            if (
                existing.device.type == "meta"
                and key not in requested
                and (f".{name}." in key or key.endswith(name))
            ):
                raise MissingTensorError(f"{where}: no tensor for `{key}`")
        # After every check: the device copies are the expensive part.
        assign = dict(zip(keys, to_devices(requests), strict=True))
        model.load_state_dict(assign, strict=False, assign=True)
        with torch.no_grad():
            for existing, value in copies:
                existing.copy_(value)
    except BaseException:
        model.delete_adapter(name)
        raise
    model.set_adapter(name, inference_mode=not is_trainable)
    if mapped is not None:
        mapped.stop_prefetch()
