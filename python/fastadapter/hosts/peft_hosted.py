"""What the two hosts with PEFT's own layers share: a PeftModel and a transformers model with adapters.

A new adapter loaded from a file is built the fast way when the config allows it: fastadapter's planner
(PEFT's matching rules) picks the targets, `_assign` checks every tensor and places it, and
`peft_layers.LayerFactory` builds PEFT's layers around the file's tensors, which stay views of the
file's mapping where dtype and device allow. Anything the fast way does not cover (DoRA, modules_to_save,
quantized or tensor-parallel models, ...) goes through PEFT's own injection on the meta device, then the
tensors are assigned: slower, the same result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _config
from .._assign import Matched, assign, check_shape
from .._device_load import to_devices
from .._inject import Plan, adapter_dtype, base_device, install, plan
from .._peft_state import lora_state_dict_unless_customised
from ..errors import MissingTensorError, TargetModuleError
from ..names import PEFT_PREFIX
from .base import AdapterHost, restore_trainability, trainability
from .peft_layers import LayerFactory, TemplateMismatch

if TYPE_CHECKING:
    from .._read import Incoming


def lora_layer_types() -> tuple[type[Any], ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def wrapper_types() -> tuple[type[Any], ...]:
    from peft.utils.other import AuxiliaryTrainingWrapper

    return (AuxiliaryTrainingWrapper,)


@dataclass
class Planned:
    """An adapter's plan on the tuned model and the file's tensors matched to it (`_assign.match`), both
    made before the load: what `add_loaded` would otherwise compute again."""

    plan: Plan
    matched: Matched


@dataclass
class Built:
    """What the model holds after the fast way added an adapter: its LoRA layers and all its modules
    (the tuned model's), known from the plan's walk and what the factory made, so that activation and
    eval() need not walk the model again (on 1024 targets those walks cost more than the rest of a load)."""

    layers: list[nn.Module]
    modules: list[nn.Module]
    first_injection: bool


class PeftLayersHost(AdapterHost):
    """Hosts whose adapters live in PEFT's layers."""

    built: Built | None = None  # set by the fast way, for `activate_loaded`

    def tuned_model(self) -> nn.Module:
        """The model whose modules hold the LoRA layers (keys of the file are relative to it)."""
        return self.model

    def adapter_state_dict(
        self, name: str, save_embeddings: bool, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        fast = lora_state_dict_unless_customised(
            self.model, name, save_embeddings, configs=self.configs(), prefix=PEFT_PREFIX
        )
        if fast is None:
            # transformers' `get_adapter_state_dict` is PEFT's selection, from `model.state_dict()`.
            from peft.utils.save_and_load import get_peft_model_state_dict

            selected: dict[str, torch.Tensor] = get_peft_model_state_dict(
                self.model, adapter_name=name, save_embedding_layers=save_embeddings
            )
            return {PEFT_PREFIX + k: v for k, v in selected.items()}
        return fast

    def new_config(self, adapter_dir: str, *, is_trainable: bool) -> Any:
        from peft import LoraConfig

        _config.read_config(
            adapter_dir
        )  # fastadapter's checks: anything it cannot load faithfully is refused
        config = LoraConfig.from_pretrained(adapter_dir)
        config.inference_mode = not is_trainable
        return config

    def fast_path_refusal(self, config: Any) -> str | None:
        """Why the fast way cannot build this adapter (None: it can)."""
        model = self.tuned_model()
        if config.use_dora:
            return "DoRA"
        if config.modules_to_save:
            return "modules_to_save"
        if config.lora_bias:
            return "lora_bias"
        if config.bias != "none":
            return f"bias={config.bias!r}"
        if config.layer_replication or config.target_parameters or config.trainable_token_indices:
            return "layer_replication / target_parameters / trainable_token_indices"
        if getattr(config, "ensure_weight_tying", False):
            return "ensure_weight_tying"
        if config._custom_modules:
            return "custom modules"
        if any(getattr(model, a, None) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "hf_quantizer")):
            return "quantized model"
        if (getattr(model, "_tp_size", None) or 1) > 1:
            return "tensor-parallel model"
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type is not None:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            if get_checkpoint_conversion_mapping(model_type) is not None:  # type: ignore[no-untyped-call]
                return f"{model_type}: PEFT rewrites the config for transformers v5's weight layout"
        return None

    def add_loaded(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        planned: Planned | None = None,
    ) -> None:
        """`planned`: the plan of this adapter on `tuned_model()` and the file's tensors matched to it, made
        by a caller that checked them before building the host's model (the patched `from_pretrained`), so
        that the fast way does not plan and check twice."""
        built = False
        if self.fast_path_refusal(config) is None:
            try:
                self._add_fast(
                    name,
                    config,
                    incoming,
                    is_trainable=is_trainable,
                    device=device,
                    dtype=dtype,
                    planned=planned,
                )
                built = True
            except TemplateMismatch:
                pass  # nothing was changed: every check runs before the model is touched
        if not built:
            self._add_through_peft(
                name, config, incoming, is_trainable=is_trainable, device=device, dtype=dtype
            )
        self.activate_loaded(name, is_trainable=is_trainable)

    # --- the fast way -----------------------------------------------------------------------------------

    def _add_fast(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        planned: Planned | None = None,
    ) -> None:
        model = self.tuned_model()
        if planned is not None:
            p, matched = planned.plan, planned.matched
        else:
            p = plan(model, config, name, layer_types=lora_layer_types(), wrapper_types=wrapper_types())
            matched = None
        a = assign(
            model,
            p,
            name,
            incoming.where,
            incoming.tensors,
            trainable=is_trainable,
            device=device,
            dtype=dtype,
            matched=matched,
        )
        if p.save_targets or p.has_wrappers:
            raise TemplateMismatch("the model has modules_to_save wrappers")  # PEFT's way handles them
        factory = LayerFactory(model, config, name)
        for t in p.targets:
            factory.template(t)  # may raise TemplateMismatch: before anything changes
        # From here on the model changes; nothing can fail for a reason the checks above did not see.
        if p.first_injection:
            # PEFT's `_mark_only_adapters_as_trainable` on a first injection (bias="none": the fast way's
            # only mode): the base model is frozen. Later injections keep every existing requires_grad.
            for module in p.modules:
                for param in module._parameters.values():
                    if param is not None and param.requires_grad:
                        param.requires_grad_(False)
        self.register_config(name, config)
        layers = list(p.layers)
        for t in p.targets:
            if t.module is t.base:
                layer = factory.new_layer(t, a.lora[t.path])  # type: ignore[arg-type]
                install(t, layer)  # type: ignore[arg-type]
                layers.append(layer)
            else:
                factory.add_to_existing(t.module, t, a.lora[t.path])  # type: ignore[arg-type]
        with torch.no_grad():
            for existing, value in a.others:
                existing.copy_(value)
        self.after_injection(name, config, [t.path for t in p.targets], is_trainable=is_trainable)
        self.built = Built(layers, [*p.modules, *factory.created], p.first_injection)

    def register_config(self, name: str, config: Any) -> None:
        self.configs()[name] = config

    def after_injection(self, name: str, config: Any, targets: list[str], *, is_trainable: bool) -> None:
        """The host's own bookkeeping once the fast way has put the layers in place."""

    def activate_loaded(self, name: str, *, is_trainable: bool) -> None:
        """What the host's own load does last: activation, train/eval mode, requires_grad."""
        raise NotImplementedError

    # --- PEFT's own way ---------------------------------------------------------------------------------

    def inject_empty(self, name: str, config: Any) -> None:
        """PEFT's own injection of adapter `name`, its weights on the meta device."""
        raise NotImplementedError

    def remove_adapter(self, name: str) -> None:
        """Undo `inject_empty` after a failure."""
        self.delete_adapter(name)

    def _add_through_peft(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """PEFT builds the layers on the meta device, then the file's tensors (views of the mapping where no
        conversion is needed) are assigned. On any failure the new adapter is deleted."""
        from peft.utils.other import AuxiliaryTrainingWrapper

        model = self.model
        where, tensors = incoming.where, incoming.tensors
        prefix = PEFT_PREFIX if self.kind == "peft" else ""
        plan(self.tuned_model(), config, name, layer_types=lora_layer_types(), wrapper_types=wrapper_types())
        before = trainability(model)
        self.inject_empty(name, config)
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
                full = aux.get(prefix + key, prefix + key)
                existing = state.get(full)
                if existing is None:
                    raise TargetModuleError(f"{where}: tensor `{full}` names nothing in the model")
                check_shape(where, full, tensor.shape, tuple(existing.shape), "the model's layer")
                if existing.device.type == "meta":
                    layer: Any = model.get_submodule(full.split(f".{name}", 1)[0].rpartition(".")[0])
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
            assigned = dict(zip(keys, to_devices(requests), strict=True))
            model.load_state_dict(assigned, strict=False, assign=True)
            with torch.no_grad():
                for existing, value in copies:
                    existing.copy_(value)
        except BaseException:
            self.remove_adapter(name)
            restore_trainability(before)
            raise


def activate_layer(layer: Any, name: str | list[str], *, trainable: bool) -> None:
    """PEFT's `BaseTunerLayer.set_adapter(name, inference_mode=not trainable)`: `name` active, its weights
    trainable (or not), every other adapter's frozen; a flag changes only where it differs. Every
    activation leaves the inactive adapters frozen, so only those active before or after this one can have
    a flag to change: the cost does not grow with the number of adapters the layer holds."""
    names = [name] if isinstance(name, str) else list(name)
    previous = layer.__dict__.get("_active_adapter") or []
    previous = [previous] if isinstance(previous, str) else previous
    layer.__dict__["_active_adapter"] = names
    modules = layer._modules
    keys = dict.fromkeys([*previous, *names])
    for field in layer.adapter_layer_names:
        container = modules[field] if field in modules else getattr(layer, field)
        for key in keys:
            if key not in container:
                continue
            entry = container[key]
            wanted = trainable and key in names
            if isinstance(entry, torch.Tensor):
                params: Any = (entry,)
            else:  # a leaf module (lora_A's nn.Linear): its own parameters, without a generator walk
                params = entry._parameters.values() if not entry._modules else entry.parameters()
            for param in params:
                if param is None:
                    continue
                if param.is_leaf and param.requires_grad != wanted:
                    param.requires_grad_(wanted)
    if layer.frozen_peft_weight_names:
        layer._freeze_non_trainable_peft_weights(names)


def activate_layers(root: nn.Module, names: list[str], *, trainable: bool) -> bool:
    """PEFT's `set_adapter` on every LoRA layer of `root`, found by a walk that does not enter them (its
    cost stays the same however many adapters they hold). False, with nothing changed, where the host's
    own walk must run: modules_to_save wrappers (PEFT activates them too), a merged layer (PEFT unmerges
    it), or no LoRA layer."""
    from .._inject import _walk

    named, _, layer_classes = _walk(root, lora_layer_types())
    wrappers = wrapper_types()
    if any(isinstance(m, wrappers) for _, m in named):
        return False
    layers = [m for _, m in named if type(m) in layer_classes]
    if not layers or any(layer.merged for layer in layers):
        return False
    for layer in layers:
        activate_layer(layer, names, trainable=trainable)
    return True


def set_training(root: nn.Module, modules: list[nn.Module], mode: bool) -> None:
    """`root.train(mode)` when `modules` are all of root's modules: nn.Module.train sets one flag per module,
    and its recursive walk costs more than the flags. A module with a `train` of its own gets torch's
    walk, except transformers' PreTrainedModel.train without kernels (then it only sets the flag)."""
    own_train = [t for t in {type(m) for m in modules} if t.train is not nn.Module.train]
    if own_train:
        # PreTrainedModel.train re-applies kernels after a mode change, when the model uses them.
        hf = sys.modules.get("transformers.modeling_utils")
        pretrained = getattr(hf, "PreTrainedModel", None)
        if pretrained is None or any(t.train is not pretrained.train for t in own_train):
            root.train(mode)
            return
        if any(getattr(m, "_use_kernels", False) for m in modules if type(m) in own_train):
            root.train(mode)
            return
    for m in modules:
        m.__dict__["training"] = mode
