"""Checking an adapter file's tensors against the plan, and matching each to where it goes: the stage of a
load between planning the targets and building the layers. Nothing here changes the model; a tensor
that does not fit (unknown module, wrong shape or dtype, a missing slot) is refused with the file and
tensor named, so a failed load leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._config import AdapterConfig
from ._device_load import to_devices
from ._inject import Plan, Target, adapter_dtype, base_device
from .errors import MissingTensorError, TargetModuleError, TensorError
from .layers import ModulesToSave
from .names import PEFT_PREFIX


def slot_suffixes(name: str) -> dict[str, str]:
    """renamed-key suffix -> slot, for adapter `name`."""
    return {
        f".lora_A.{name}.weight": "lora_A.weight",
        f".lora_B.{name}.weight": "lora_B.weight",
        f".lora_B.{name}.bias": "lora_B.bias",
        f".lora_magnitude_vector.{name}.weight": "lora_magnitude_vector",
        f".lora_embedding_A.{name}": "lora_embedding_A",
        f".lora_embedding_B.{name}": "lora_embedding_B",
    }


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


def check_shape(where: str, key: str, got: torch.Size, expected: tuple[int, ...], base: str) -> None:
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
            module = getattr(found, "base_layer", None) if hasattr(found, "lora_A") else None
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


@dataclass
class Matched:
    """Every tensor of a file matched to its place in the plan and checked; nothing converted yet."""

    lora: dict[str, dict[str, torch.Tensor]]  # target path -> slot -> the file's tensor
    save_values: dict[str, dict[str, torch.Tensor]]  # modules_to_save path -> key -> the file's tensor
    others: list[tuple[torch.Tensor, torch.Tensor]]  # (model tensor, the file's tensor)


def assign(
    model: nn.Module,
    p: Plan,
    name: str,
    where: str,
    tensors: dict[str, torch.Tensor],
    *,
    trainable: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    matched: Matched | None = None,
) -> Assignment:
    """`match`, then each LoRA tensor converted for its base layer (`matched`: `match`'s result for the
    same plan and tensors, when the caller checked them already)."""
    m = matched if matched is not None else match(model, p, name, where, tensors)
    lora = m.lora
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
    save_paths = {path: module for path, _, _, module in p.save_targets}
    copies = {
        path: filled_copy(module, m.save_values[path], where, path, trainable)
        for path, module in save_paths.items()
    }
    return Assignment(ready, copies, m.others)


def match(model: nn.Module, p: Plan, name: str, where: str, tensors: dict[str, torch.Tensor]) -> Matched:
    """Check every tensor of the file (keyed as the model holds them for adapter `name`) against plan `p`
    and say where each goes; a tensor that fits nowhere, has the wrong shape or dtype, or a slot left
    empty is refused, naming the file and the tensor. Reads shapes and dtypes only."""
    config = p.config
    targets = {t.path: t for t in p.targets}
    suffixes = slot_suffixes(name)
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
                check_shape(
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
        check_shape(where, key, tensor.shape, tuple(existing.shape), "the model's tensor")
        others.append((existing, tensor))

    for t in p.targets:
        got = lora[t.path]
        expected = expected_shapes.get(t.path) or _expected_shapes(t, config)
        if len(got) != len(expected):  # every slot in `got` was checked to be in `expected`
            missing = next(s for s in expected if s not in got)
            raise MissingTensorError(f"{where}: no `{missing}` tensor for targeted module `{t.path}`")
    return Matched(lora, save_values, others)


def converted(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
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


def filled_copy(
    original: nn.Module, values: dict[str, torch.Tensor], where: str, path: str, trainable: bool
) -> nn.Module:
    """modules_to_save: the adapter's own copy of `original`, its tensors taken from the file."""
    source = original.original_module if isinstance(original, ModulesToSave) else original
    expected = source.state_dict(keep_vars=True)
    for key in values:
        if key not in expected:
            raise TargetModuleError(f"{where}: tensor `{PEFT_PREFIX}{path}.{key}` names nothing in `{path}`")
        check_shape(where, f"{path}.{key}", values[key].shape, tuple(expected[key].shape), f"`{path}`")
    copy = ModulesToSave.empty_copy(source)
    for pname, _ in list(copy.named_parameters(remove_duplicate=False)):
        owner_path, _, leaf = pname.rpartition(".")
        owner = copy.get_submodule(owner_path) if owner_path else copy
        original_param = expected[pname]
        value = values.get(pname)
        data = (
            original_param.detach().clone()
            if value is None
            else converted(value, original_param.device, original_param.dtype)
        )
        owner._parameters[leaf] = nn.Parameter(data, requires_grad=trainable)
    for bname, buf in copy.named_buffers():
        if bname in values:
            owner_path, _, leaf = bname.rpartition(".")
            owner = copy.get_submodule(owner_path) if owner_path else copy
            owner._buffers[leaf] = converted(values[bname], buf.device, buf.dtype).clone()
    return copy
