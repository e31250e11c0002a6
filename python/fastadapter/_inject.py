"""Which modules an adapter targets (peft 0.21's matching rules), and building its layers.

Planning never touches the model: it walks `named_modules()`, applies PEFT's rules (`target_modules` as a
list of names or suffixes, a regex, or "all-linear"; `exclude_modules`; `layers_to_transform` /
`layers_pattern`; `rank_pattern` / `alpha_pattern`; `modules_to_save`) and checks that each target is a
layer fastadapter can adapt. Only once a load has checked every tensor against the plan are modules
replaced, so a failed load or inject leaves the model as it was.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ._config import AdapterConfig
from .errors import TargetModuleError, UnsupportedAdapterError, UnsupportedTargetError
from .layers import DoraMagnitude, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave, fast_linear, is_conv1d
from .names import ALL_LINEAR

MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # peft.utils.constants
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
# peft's cast_adapter_dtype upcasts these to fp32 (autocast_adapter_dtype=True, the default).
_UPCAST = {torch.float16, torch.bfloat16} | {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
}


@dataclass
class Target:
    path: str
    parent: nn.Module
    child_name: str
    module: Any  # what sits at `path` now: the base layer, or a LoraLayer holding other adapters
    base: Any
    kind: str  # "linear" | "conv1d" | "embedding"
    r: int
    alpha: float

    @property
    def in_out(self) -> tuple[int, int]:
        w = self.base.weight
        if self.kind == "conv1d":
            return int(w.shape[0]), int(w.shape[1])
        if self.kind == "embedding":
            return int(self.base.num_embeddings), int(self.base.embedding_dim)
        return int(self.base.in_features), int(self.base.out_features)


@dataclass
class Plan:
    config: AdapterConfig
    targets: list[Target] = field(default_factory=list)
    save_targets: list[tuple[str, nn.Module, str, nn.Module]] = field(
        default_factory=list
    )  # path, parent, name, mod
    first_injection: bool = True
    # Every module of the model as planning saw it (each once): what a first injection freezes and
    # eval() sets, without walking the model again. Not the entries of a LoRA layer's adapter container
    # in eval mode (one per adapter held): eval() set them with it, and listing them would make each load
    # cost more than the one before. With `plan(containers=False)` not those of any container.
    modules: list[nn.Module] = field(default_factory=list)
    # The LoRA layers (`layer_types`) among them; whether any is a modules_to_save wrapper.
    layers: list[nn.Module] = field(default_factory=list)
    has_wrappers: bool = False


# The config fields `plan` may rewrite, as PEFT's injection rewrites them: all-linear and long target
# lists (`target_modules`), `fan_in_fan_out` per layer type. A plan made on a copy of a config is that
# config's plan once these are copied back.
PLAN_REWRITES = ("target_modules", "fan_in_fan_out")


def get_submodule_parent(
    model: nn.Module, path: str, known: dict[str, nn.Module] | None = None
) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of `path`; `known` (path -> module, e.g. from `named_modules()`)
    saves walking the path attribute by attribute."""
    parent_path, _, name = path.rpartition(".")
    if not parent_path:
        return model, name
    parent = known.get(parent_path) if known is not None else None
    return (parent if parent is not None else model.get_submodule(parent_path)), name


def pattern_key(patterns: Iterable[str], key: str) -> str:
    """peft.utils.other.get_pattern_key"""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _excluded(config: AdapterConfig, key: str) -> bool:
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return True
    mts = config.modules_to_save
    return bool(mts) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts)


def target_matches(config: AdapterConfig, key: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists (exclusions give False)."""
    if _excluded(config, key):
        return False
    target = config.target_modules
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    if not any(key.endswith(f".{t}") for t in target):
        return False
    layer_indexes = config.layers_to_transform
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    layers_pattern = config.layers_pattern
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def _is_pretrained_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def _resolve_all_linear(config: AdapterConfig, model: nn.Module, layer_types: tuple[type[Any], ...]) -> None:
    """peft's `_maybe_include_all_linear_layers`: every Linear / Conv1D except the output layer."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module) or _wraps_linear(module, layer_types):
            names.add(name)
    exclude = set()
    if _is_pretrained_model(model):
        output = model.get_output_embeddings()  # type: ignore[operator]
        if output is not None:
            exclude.add(next(n for n, m in model.named_modules() if m is output))
        elif config.task_type == "SEQ_CLS":
            for head_name in SEQ_CLS_HEAD_NAMES:
                head = getattr(model, head_name, None)
                if head is not None:
                    exclude.add(next(n for n, m in model.named_modules() if m is head))
                    break
    for prefix, module in model.named_modules():
        if isinstance(module, layer_types):
            exclude.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    config.target_modules = names - exclude


def _wraps_linear(module: nn.Module, layer_types: tuple[type[Any], ...]) -> bool:
    if not isinstance(module, layer_types):
        return False
    base = module.base_layer
    return isinstance(base, nn.Linear) or is_conv1d(base)


def _minimal_target_modules(targets: set[str], others: list[str]) -> set[str]:
    """peft's `_find_minimal_target_modules` (it rewrites long target lists, and so the saved config)."""

    def suffixes(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {suffix for item in set(others) for suffix in suffixes(item)}
    required: set[str] = set()
    for item, item_suffixes in sorted({t: suffixes(t) for t in targets}.items(), key=lambda kv: kv[1]):
        for suffix in item_suffixes:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required or set(targets)


def _kind(base: Any) -> str | None:
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, nn.Linear):
        return "linear"
    if is_conv1d(base):
        return "conv1d"
    return None


def _walk(
    model: nn.Module, layer_types: tuple[type[Any], ...], containers: bool = True
) -> tuple[list[tuple[str, nn.Module]], list[nn.Module], set[type[Any]]]:
    """`model.named_modules()` (its order, each module once) without the modules inside LoRA layers, which
    are never targets: those come as a plain list. Also the LoRA layer classes met. Written out because
    on a model holding a thousand LoRA layers, named_modules' generators (one per module, keys built for
    every module inside every layer) cost more than the rest of a plan."""
    is_layer: dict[type[Any], bool] = {}
    seen = {id(model)}
    named: list[tuple[str, nn.Module]] = [("", model)]
    inside: list[nn.Module] = []

    def layer_class(t: type[Any]) -> bool:
        known = is_layer.get(t)
        if known is None:
            known = is_layer[t] = issubclass(t, layer_types)
        return known

    def within(module: nn.Module, layer: bool = False) -> None:
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                inside.append(child)
                if child._modules and not (
                    layer and type(child) is nn.ModuleDict and (not containers or not child.training)
                ):
                    within(child)

    def outside(prefix: str, module: nn.Module) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            key = prefix + name
            named.append((key, child))
            if layer_class(type(child)):
                within(child, layer=True)
            elif child._modules:
                outside(key + ".", child)

    if layer_class(type(model)):
        within(model, layer=True)
    else:
        outside("", model)
    return named, inside, {t for t, layer in is_layer.items() if layer}


def plan(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    *,
    layer_types: tuple[type[Any], ...] = (LoraLayer,),
    wrapper_types: tuple[type[Any], ...] = (ModulesToSave,),
    containers: bool = True,
) -> Plan:
    """Decide what to adapt, checking everything; `config` may be rewritten as PEFT rewrites it (all-linear,
    long target lists, fan_in_fan_out). `layer_types` / `wrapper_types`: the LoRA layers and
    modules_to_save wrappers the model may hold already (fastadapter's, or PEFT's). `containers=False`:
    the caller sets no flag on modules already inside LoRA layers (`Plan.modules`), so the walk does not
    list their adapter containers' entries, in training mode either."""
    named, inside, layer_classes = _walk(model, layer_types, containers)
    by_path = dict(named)
    wrapper_classes = {t for t in {type(m) for _, m in named} if issubclass(t, wrapper_types)}
    lora = [(k, m) for k, m in named if type(m) in layer_classes]
    lora_prefixes = [k + "." for k, _ in lora]
    result = Plan(
        config,
        first_injection=not lora and not wrapper_classes,
        modules=[*(m for _, m in named), *inside],
        layers=[m for _, m in lora],
        has_wrappers=bool(wrapper_classes),
    )
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        _resolve_all_linear(config, model, layer_types)
    target = config.target_modules
    if isinstance(target, set) and len(target) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        keys = [k for k, _ in model.named_modules()]  # PEFT's list: the keys inside LoRA layers too
        others = [k for k in keys if k not in target and not k.endswith(tuple("." + t for t in target))]
        smaller = _minimal_target_modules(target, others)
        if len(smaller) < len(target):
            config.target_modules = smaller

    excluded = unmatched = 0
    rank_pattern, alpha_pattern = config.rank_pattern, config.alpha_pattern
    for key, module in named:
        if not key:
            continue
        is_layer = type(module) in layer_classes
        if not target_matches(config, key):
            if _excluded(config, key):
                excluded += 1
            else:
                unmatched += 1
            continue
        base = module.base_layer if is_layer else module
        kind = _kind(base)
        if kind is None:
            raise UnsupportedTargetError(
                f"target module `{key}` is a {type(base).__name__}; fastadapter adapts nn.Linear, "
                "transformers Conv1D and nn.Embedding"
            )
        if is_layer and adapter_name in cast(Any, module).r:
            raise TargetModuleError(f"module `{key}` already holds an adapter named {adapter_name!r}")
        if kind == "embedding" and config.use_dora:
            raise UnsupportedAdapterError(
                f"DoRA on embedding layers (`{key}`) is not supported by fastadapter"
            )
        if kind == "embedding" and config.lora_bias:
            raise UnsupportedAdapterError(f"lora_bias=True is not supported for embedding layers (`{key}`)")
        r = rank_pattern.get(pattern_key(rank_pattern, key), config.r) if rank_pattern else config.r
        alpha = (
            alpha_pattern.get(pattern_key(alpha_pattern, key), config.lora_alpha)
            if alpha_pattern
            else config.lora_alpha
        )
        parent, child = get_submodule_parent(model, key, by_path)
        result.targets.append(Target(key, parent, child, module, base, kind, r, alpha))

    if not result.targets:
        if excluded and not unmatched:
            raise TargetModuleError(
                "All modules were excluded. Check `target_modules`, `exclude_modules` and `modules_to_save`."
            )
        raise TargetModuleError(
            f"target modules {_show(config.target_modules)} not found in the model "
            f"({type(model).__name__}); check `target_modules`"
            + (f", `layers_to_transform`={config.layers_to_transform}" if config.layers_to_transform else "")
        )
    _fix_fan_in_fan_out(config, result.targets)

    mts = config.modules_to_save
    if mts:
        keys = [k for k, _ in model.named_modules(remove_duplicate=False)]
        for key in keys:
            if not any(key.endswith(m) for m in mts):
                continue
            parent, child = get_submodule_parent(model, key)
            target_module = parent.get_submodule(child)
            if isinstance(target_module, wrapper_types):
                if adapter_name in target_module.modules_to_save._modules:
                    raise TargetModuleError(f"`{key}` already holds a copy for adapter {adapter_name!r}")
            elif any(key.startswith(p) for p in lora_prefixes) or any(
                key.startswith(f"{p}original_module") or key.startswith(f"{p}modules_to_save")
                for p in (k + "." for k, m in named if isinstance(m, wrapper_types))
            ):
                continue
            result.save_targets.append((key, parent, child, target_module))
    return result


def _show(target: Any) -> str:
    return repr(sorted(target)) if isinstance(target, (set, frozenset)) else repr(target)


def _fix_fan_in_fan_out(config: AdapterConfig, targets: list[Target]) -> None:
    # peft's dispatch_default corrects the (shared) config per layer type, with these warnings.
    for t in targets:
        if t.kind == "linear" and config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=4,
            )
            config.fan_in_fan_out = False
        elif t.kind == "conv1d" and not config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to False but the target module is `Conv1D`. "
                "Setting fan_in_fan_out to True.",
                stacklevel=4,
            )
            config.fan_in_fan_out = True


# PEFT's `autocast_adapter_dtype` for the load in progress (`fastadapter.load` sets it): False keeps
# fp16/bf16/fp8 adapters in their base layer's dtype. A context variable, so that every stage of the load
# sees it without each host's signature carrying it.
AUTOCAST_ADAPTER_DTYPE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastadapter_autocast_adapter_dtype", default=True
)


def adapter_dtype(base: Any, dtype: torch.dtype | None) -> torch.dtype:
    """PEFT's policy: the base layer's float dtype, fp16/bf16/fp8 upcast to fp32 (unless
    `autocast_adapter_dtype=False`); or the caller's dtype."""
    if dtype is not None:
        return dtype
    w = base.weight
    if not (w.dtype.is_floating_point or w.dtype.is_complex):
        return torch.float32
    return torch.float32 if w.dtype in _UPCAST and AUTOCAST_ADAPTER_DTYPE.get() else w.dtype


def base_device(base: Any, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else base.weight.device


def wrap(target: Target) -> LoraLayer:
    """The LoRA layer for a target: the existing one (another adapter is there), or a new empty wrapper."""
    if isinstance(target.module, LoraLayer):
        return target.module
    if target.kind == "embedding":
        return LoraEmbedding(target.base)
    return LoraLinear(target.base, fan_in_fan_out=target.kind == "conv1d")


def install(target: Target, layer: LoraLayer) -> None:
    if layer is not target.module:
        target.parent._modules[target.child_name] = layer  # replaces in place, keeps child order


def add_loaded(
    layer: LoraLayer, target: Target, name: str, config: AdapterConfig, tensors: dict[str, nn.Parameter]
) -> None:
    layer.set_settings(name, target.r, target.alpha, config.use_rslora, config.lora_dropout)
    if isinstance(layer, LoraEmbedding):
        layer.add(name, tensors["lora_embedding_A"], tensors["lora_embedding_B"])
        return
    assert isinstance(layer, LoraLinear)
    magnitude = None
    if "lora_magnitude_vector" in tensors:
        magnitude = DoraMagnitude(tensors["lora_magnitude_vector"], layer.fan_in_fan_out)
    layer.add(
        name,
        fast_linear(tensors["lora_A.weight"]),
        fast_linear(tensors["lora_B.weight"], tensors.get("lora_B.bias")),
        magnitude,
    )


def add_fresh(
    layer: LoraLayer,
    target: Target,
    name: str,
    config: AdapterConfig,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """A new trainable adapter, initialised as PEFT's `update_layer` does, consuming the random generator in
    the same order (module construction, then `reset_lora_parameters`), then moved to the base layer's
    device and dtype and upcast, as PEFT does."""
    layer.set_settings(name, target.r, target.alpha, config.use_rslora, config.lora_dropout)
    r = target.r
    in_f, out_f = target.in_out
    init = config.init_lora_weights
    base_dtype = target.base.weight.dtype
    cast = base_dtype if (base_dtype.is_floating_point or base_dtype.is_complex) else None
    final = adapter_dtype(target.base, dtype)
    dev = base_device(target.base, device)

    def place(t: torch.Tensor) -> nn.Parameter:
        t = t.to(dev, dtype=cast) if cast is not None else t.to(dev)
        return nn.Parameter(t.to(final), requires_grad=True)

    if isinstance(layer, LoraEmbedding):
        weight_A, weight_B = torch.randn((r, in_f)), torch.randn((out_f, r))
        if init is not False:
            nn.init.zeros_(weight_A)
            nn.init.normal_(weight_B)
        layer.add(name, place(weight_A), place(weight_B))
        return
    assert isinstance(layer, LoraLinear)
    lora_A = nn.Linear(in_f, r, bias=False)
    lora_B = nn.Linear(r, out_f, bias=config.lora_bias)
    if init is True:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(lora_A.weight, std=1 / r)
    if init is not False:
        nn.init.zeros_(lora_B.weight)
        if lora_B.bias is not None:
            nn.init.zeros_(lora_B.bias)
    # peft moves the new weights to the base layer's dtype before DoRA's init and upcasts afterwards.
    cast_A = (
        lora_A.weight.detach().to(dev, dtype=cast) if cast is not None else lora_A.weight.detach().to(dev)
    )
    cast_B = (
        lora_B.weight.detach().to(dev, dtype=cast) if cast is not None else lora_B.weight.detach().to(dev)
    )
    magnitude = None
    if config.use_dora:
        magnitude = DoraMagnitude(
            nn.Parameter(
                _dora_norm(target.base, cast_A, cast_B, layer.scaling[name], layer.fan_in_fan_out).to(final)
            ),
            layer.fan_in_fan_out,
        )
    bias = None if lora_B.bias is None else place(lora_B.bias.detach())
    layer.add(
        name,
        fast_linear(nn.Parameter(cast_A.to(final))),
        fast_linear(nn.Parameter(cast_B.to(final)), bias),
        magnitude,
    )


@torch.no_grad()
def _dora_norm(
    base: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """peft's DoraLinearLayer.update_layer: the initial magnitude, the norm of W + scaling * B A."""
    is_fp16 = lora_A.dtype == torch.float16
    if is_fp16:
        lora_A, lora_B = lora_A.float(), lora_B.float()
    lora_weight = lora_B @ lora_A
    if is_fp16:
        lora_weight = lora_weight.half()
    weight = base.weight.to(lora_A.device)
    weight = weight.T if fan_in_fan_out else weight
    weight = weight + scaling * lora_weight
    norm: torch.Tensor = torch.linalg.norm(weight, dim=1).to(weight.dtype)
    return norm


def wrap_modules_to_save(
    save_targets: list[tuple[str, nn.Module, str, nn.Module]],
    name: str,
    copies: dict[str, nn.Module],
) -> None:
    """Install each module's per-adapter copy (`copies[path]`), wrapping it first if needed."""
    for path, parent, child, module in save_targets:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.modules_to_save._modules[name] = copies[path]
        if wrapper is not module:
            parent._modules[child] = wrapper
