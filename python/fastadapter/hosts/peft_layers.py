"""PEFT's own LoRA layers (`peft.tuners.lora.Linear` / `Embedding`), built at the cost of fastadapter's.

PEFT builds each layer through `inject_adapter`: a walk of every module per target, `update_layer` with a
random init (or a meta-device round trip), per-layer `set_adapter`, `_mark_only_adapters_as_trainable`
over every parameter; ~10x what fastadapter's own layers cost for the same file. Here PEFT builds ONE
layer per kind (its real constructor, on the meta device, with the adapter's config and the keyword
arguments `_create_and_replace` passes), and every target's layer is a copy of that template around the
target's base layer and the file's tensors. The template decides every field; only the per-target ones
(features, rank, alpha, scaling, target name) and the containers are new. A template field whose kind
this copy does not know makes `TemplateMismatch`, and the caller uses PEFT's own injection instead.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any, cast

from torch import nn

from .._inject import Target
from ..layers import empty_module_dict, empty_parameter_dict, fast_linear, init_module

# nn.Module's own fields: `init_module` makes them fresh for every copy.
_MODULE_FIELDS = frozenset(
    (
        "training",
        "_parameters",
        "_buffers",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_modules",
    )
)
# Per-adapter settings: one entry per adapter name, the value the same for every target except these.
_PER_ADAPTER = frozenset(
    ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "lora_bias", "lora_variant")
)
_EMPTY_CONTAINERS = frozenset(("_caches",))
_IMMUTABLE = (bool, int, float, str, type(None))


# Templates of earlier loads: building one costs PEFT's constructor (~2 ms), a fifth of a 56-layer load.
_TEMPLATES: OrderedDict[str, nn.Module] = OrderedDict()
_TEMPLATES_KEPT = 32


def _template_key(kind: str, name: str, config: Any, kwargs: dict[str, Any]) -> str:
    """Everything a template is built from: the layer kind, the adapter name, the whole config and the
    constructor's keyword arguments (the per-target name aside, which every copy replaces)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value, key=repr)
        return repr(value)

    settings = {k: v for k, v in kwargs.items() if k != "target_name"}
    return json.dumps([kind, name, config.to_dict(), settings], sort_keys=True, default=plain)


class TemplateMismatch(Exception):
    """The installed peft builds a layer this module does not know how to copy."""


def create_kwargs(model: nn.Module, config: Any, key: str) -> dict[str, Any]:
    """What peft's `LoraModel._create_and_replace` passes on to the layer constructor (peft 0.21), less
    `r` / `lora_alpha`, which the caller gives per target."""
    from peft.tuners.tuners_utils import get_device_map

    return {
        "target_name": key,
        "loaded_in_8bit": getattr(model, "is_loaded_in_8bit", False),
        "loaded_in_4bit": getattr(model, "is_loaded_in_4bit", False),
        "ephemeral_gpu_offload": config.runtime_config.ephemeral_gpu_offload,
        "tied_adapter": {},
        "device_map": get_device_map(model),
    }


class LayerFactory:
    """Layers for one adapter (name + config) on one model."""

    def __init__(self, model: nn.Module, config: Any, name: str) -> None:
        self.model, self.config, self.name = model, config, name
        self._templates: dict[str, nn.Module] = {}
        # Every module this factory made (layers, containers, entries): with the modules the model had
        # before, all its modules, so that activation need not walk the model to find them.
        self.created: list[nn.Module] = []

    def template(self, t: Target) -> nn.Module:
        """PEFT's own layer for a target of this kind, built on the meta device (no init cost), or the one
        an earlier load built for the same name, kind, config and model settings (templates are only read)."""
        template = self._templates.get(t.kind)
        if template is not None:
            return template
        kwargs = create_kwargs(self.model, self.config, t.path)
        key = _template_key(t.kind, self.name, self.config, kwargs)
        template = _TEMPLATES.get(key)
        if template is None:
            from peft.tuners.lora.layer import Embedding, Linear
            from peft.utils.integrations import init_empty_weights

            with init_empty_weights():
                if t.kind == "embedding":
                    template = Embedding(
                        nn.Embedding(2, 2), self.name, config=self.config, r=1, lora_alpha=1, **kwargs
                    )
                else:
                    template = Linear(
                        nn.Linear(2, 2),
                        self.name,
                        config=self.config,
                        r=1,
                        lora_alpha=1,
                        is_target_conv_1d_layer=t.kind == "conv1d",
                        **kwargs,
                    )
            _check_template(template)
            _TEMPLATES[key] = template
            while len(_TEMPLATES) > _TEMPLATES_KEPT:
                _TEMPLATES.popitem(last=False)
        self._templates[t.kind] = template
        return template

    def new_layer(self, t: Target, tensors: dict[str, nn.Parameter]) -> nn.Module:
        """A copy of the template around `t.base`, holding `tensors` (slot -> parameter, its requires_grad
        already set by `_assign`)."""
        template = self.template(t)
        layer = type(template).__new__(type(template))
        init_module(layer)
        d = layer.__dict__
        for field, value in template.__dict__.items():
            if field in _MODULE_FIELDS:
                continue
            if field in _EMPTY_CONTAINERS:
                d[field] = {}
            elif field in _PER_ADAPTER:
                d[field] = dict(value)
            elif field == "kwargs":
                d[field] = {**value, "target_name": t.path}
            elif isinstance(value, list):
                d[field] = list(value)
            else:
                d[field] = value
        in_f, out_f = t.in_out
        d["in_features"], d["out_features"] = in_f, out_f
        self._settings(d, t)
        modules = layer._modules
        modules["base_layer"] = t.base
        self.created.append(layer)
        for field, container in _containers(template):
            fresh = _empty_like(container)
            modules[field] = fresh
            self.created.append(fresh)
            self._fill(field, fresh, container, tensors)
        return layer

    def add_to_existing(self, layer: nn.Module, t: Target, tensors: dict[str, nn.Parameter]) -> None:
        """PEFT's `update_layer` for a layer that holds other adapters: the new adapter's entries."""
        template = self.template(t)
        d = layer.__dict__
        for field in _PER_ADAPTER:
            if field in template.__dict__:
                src: dict[str, Any] = template.__dict__[field]
                if self.name in src:
                    d[field][self.name] = src[self.name]
                else:
                    d[field].pop(self.name, None)
        self._settings(d, t)
        for field, container in _containers(template):
            self._fill(field, cast(nn.Module, layer._modules[field]), container, tensors)

    def _settings(self, d: dict[str, Any], t: Target) -> None:
        name = self.name
        d["r"][name] = t.r
        d["lora_alpha"][name] = t.alpha
        d["scaling"][name] = t.alpha / math.sqrt(t.r) if self.config.use_rslora else t.alpha / t.r

    def _fill(
        self, field: str, fresh: nn.Module, container: nn.Module, tensors: dict[str, nn.Parameter]
    ) -> None:
        name = self.name
        entry = container._modules.get(name)
        made: nn.Module | None = None
        if field == "lora_A":
            made = fast_linear(tensors["lora_A.weight"])
        elif field == "lora_B":
            made = fast_linear(tensors["lora_B.weight"], tensors.get("lora_B.bias"))
        elif field in ("lora_embedding_A", "lora_embedding_B"):
            if name in container._parameters:
                cast(nn.ParameterDict, fresh)[name] = tensors[field]  # keeps the dict's key list in step
        elif entry is not None:
            made = _stateless_copy(entry)  # dropout: Identity or Dropout(p)
        if made is not None:
            fresh._modules[name] = made
            self.created.append(made)


def _check_template(template: nn.Module) -> None:
    for field, value in template.__dict__.items():
        if (
            field in _MODULE_FIELDS
            or field in _PER_ADAPTER
            or field in _EMPTY_CONTAINERS
            or field == "kwargs"
        ):
            if field in _PER_ADAPTER and not isinstance(value, dict):
                raise TemplateMismatch(f"{field} is a {type(value).__name__}")
            continue
        if not isinstance(value, (*_IMMUTABLE, list)):
            raise TemplateMismatch(f"field {field} ({type(value).__name__})")
    for field, container in _containers(template):
        if type(container) not in (nn.ModuleDict, nn.ParameterDict):
            raise TemplateMismatch(f"container {field} ({type(container).__name__})")
        for entry in container._modules.values():
            if field not in ("lora_A", "lora_B") and entry is not None and entry._parameters:
                raise TemplateMismatch(f"{field} entry holds parameters")


def _containers(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layer's adapter containers (lora_A, lora_dropout, ...): every child but the base layer."""
    return [(f, c) for f, c in layer._modules.items() if f != "base_layer" and c is not None]


def _empty_like(container: nn.Module) -> nn.Module:
    if type(container) is nn.ModuleDict:
        return empty_module_dict()
    return empty_parameter_dict()


def _stateless_copy(module: nn.Module) -> nn.Module:
    """A fresh module like `module`, which holds no tensors (nn.Identity, nn.Dropout)."""
    copy = type(module).__new__(type(module))
    init_module(copy)
    for field, value in module.__dict__.items():
        if field not in _MODULE_FIELDS:
            copy.__dict__[field] = value
    copy.__dict__["training"] = module.training
    return copy
