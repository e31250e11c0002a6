"""PEFT's loads done by fastadapter, with PEFT's semantics (imported when one is routed: needs torch, peft).

- `from_pretrained`: the PeftModel is PEFT's own, built around an adapter that targets nothing (PEFT's
  "dummy-target-modules"), so its wrapper, tuner and bookkeeping are exactly PEFT's; then fastadapter
  adds the real adapter from the file (PEFT's layers built from a template around the file's tensors)
  and activates it as `from_pretrained` does. Everything fastadapter checks is checked on the bare model
  before the wrapper is built.
- `load_adapter`: a new adapter added by fastadapter, then left inactive, frozen unless `is_trainable`,
  the model in eval() unless trainable; PEFT's load result (no missing, no unexpected keys) is returned.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .._assign import match
from .._inject import AUTOCAST_ADAPTER_DTYPE, PLAN_REWRITES, plan
from .._read import Incoming, read_weights
from ..adapters import _gc_paused
from ..errors import UnsupportedAdapterError
from ..hosts.peft_hosted import (
    PeftLayersHost,
    Planned,
    lora_layer_types,
    set_training,
    wrapper_types,
)
from ..hosts.peft_model import PeftHost

# low_cpu_mem_usage=True: PEFT casts the file's tensors to their base layer's dtype before upcasting them,
# so with a 16-bit base the fp32 weights it ends with are rounded; fastadapter's are not.
_ROUNDED = (torch.float16, torch.bfloat16)
_LOW_CPU_ROUNDS = "low_cpu_mem_usage with a 16-bit base (PEFT rounds the weights through it)"


@dataclass
class NewLora:
    """What the check of a routed `from_pretrained` made, for the build to use: the config, the file's
    tensors, the adapter planned on the bare model (on a copy of the config) with the tensors matched to
    it, and the warnings planning gave (PEFT gives them while it injects: the build repeats them)."""

    config: Any
    incoming: Incoming
    planned: Planned
    warned: list[warnings.WarningMessage] = field(default_factory=list)


def check_new_lora(
    model: nn.Module, model_id: str, name: str, config: Any, *, low_cpu_mem_usage: bool, autocast: bool
) -> str | NewLora:
    """Everything `from_pretrained` of this LoRA adapter onto `model` would do that fastadapter must match,
    checked on a copy of the config without touching the model: what the build needs, or why not."""
    from .._config import config_from_object

    config_from_object(config)  # fastadapter's own checks: unsupported options raise
    # The host's own list of what its fast way does not build; it asks only for the model.
    bare: Any = SimpleNamespace(tuned_model=lambda: model)
    refusal = PeftLayersHost.fast_path_refusal(bare, config)
    if refusal is not None:
        return refusal
    if config.exclude_modules:
        return "exclude_modules (PEFT warns when it excludes nothing)"
    # Planning rebinds the config's PLAN_REWRITES fields (never changes their values in place): a shallow
    # copy keeps the caller's config as it was if PEFT's own code ends up running.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        planned = plan(
            model, copy.copy(config), name, layer_types=lora_layer_types(), wrapper_types=wrapper_types()
        )
    if not planned.first_injection:
        return "the model already holds LoRA layers"
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, pattern_field) or {}:
            if not any(re.match(rf"(.*\.)?({pattern})$", t.path) for t in planned.targets):
                return f"{pattern_field} entry that matches no target (PEFT warns)"
    bases = [t.base.weight for t in planned.targets]
    if any(w.device.type == "meta" for w in bases):
        return "base weights on the meta device"
    if any(t.kind == "embedding" for t in planned.targets) and _ties_embeddings(model):
        return "embedding target with tied embeddings (PEFT warns)"
    incoming = read_weights(model_id, name)
    try:
        matched = match(model, planned, name, incoming.where, incoming.tensors)
    except BaseException:
        incoming.done()
        raise
    if low_cpu_mem_usage and autocast and any(w.dtype in _ROUNDED for w in bases):
        incoming.done()
        return _LOW_CPU_ROUNDS
    return NewLora(config, incoming, Planned(planned, matched), list(warned))


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def _still_planned(peft_model: Any, model: nn.Module, planned: Planned) -> bool:
    """PEFT's wrapper, built around an adapter that targets nothing, left the tuned model's tree as it was
    planned: each target where the plan found it (a cheap check that the plan can be used)."""
    return peft_model.base_model.model is model and all(
        t.parent._modules.get(t.child_name) is t.module for t in planned.plan.targets
    )


@_gc_paused
def from_pretrained_fast(
    cls: Any,
    model: nn.Module,
    config: Any,
    incoming: Incoming,
    name: str,
    is_trainable: bool,
    autocast_adapter_dtype: bool,
    checked: NewLora | None = None,
) -> Any:
    """PEFT's wrapper around `model`, then the adapter in `incoming` added as `from_pretrained` adds it.
    `checked`: `check_new_lora`'s result for this call, whose plan is used rather than made again."""
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.utils.constants import DUMMY_TARGET_MODULES

    config.inference_mode = not is_trainable
    if checked is not None:
        # PEFT gives planning's warnings while its wrapper injects the adapter, before the wrapper's own.
        for w in checked.warned:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    shell_config = copy.copy(config)
    shell_config.target_modules = DUMMY_TARGET_MODULES
    peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, cls)
    peft_model = peft_cls(
        model, shell_config, name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=True
    )
    del peft_model.peft_config[name]  # the real config is registered by the load below
    planned = None
    if checked is not None:
        if _still_planned(peft_model, model, checked.planned):
            planned = checked.planned
            # The plan was made on a copy of the config: the config gets what planning rewrote in it.
            for rewritten in PLAN_REWRITES:
                setattr(config, rewritten, getattr(planned.plan.config, rewritten))
            planned.plan.config = config
        else:
            # Not expected (the wrapper targets nothing): planned again, quietly, as its warnings were given.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = plan(
                    model, config, name, layer_types=lora_layer_types(), wrapper_types=wrapper_types()
                )
            planned = Planned(again, match(model, again, name, incoming.where, incoming.tensors))
    token = AUTOCAST_ADAPTER_DTYPE.set(autocast_adapter_dtype)
    try:
        PeftHost(peft_model).add_loaded(
            name, config, incoming, is_trainable=is_trainable, device=None, dtype=None, planned=planned
        )
    finally:
        AUTOCAST_ADAPTER_DTYPE.reset(token)
        incoming.done()
    return peft_model


class _LoadAdapterHost(PeftHost):
    """`PeftModel.load_adapter`'s ending instead of `fastadapter.load`'s: the new adapter is not activated."""

    active_before: list[str]

    def activate_loaded(self, name: str, *, is_trainable: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Layers made for this adapter alone start with it active; PEFT leaves them with the model's
        # active adapters (which they do not hold), as it leaves every other layer. The fast way knows
        # its layers and every module from the plan's walk: two walks of the whole model (this one and
        # eval()'s) cost as much as the rest of a load on 1024 targets.
        built = self.built
        layers: list[Any] = (
            built.layers
            if built is not None
            else [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        )
        for layer in layers:
            if layer.active_adapters == [name]:
                layer._active_adapter = list(self.active_before)
        if is_trainable:
            return
        if built is None:
            self.peft_model.eval()
        else:
            peft_model = self.peft_model
            set_training(peft_model, [peft_model, peft_model.base_model, *built.modules], False)
            # The plan leaves out the other adapters' entries of a layer's containers (fastadapter.load's
            # constant cost); PEFT's eval() reaches them too, so one set in train mode by hand is reset here.
            for layer in built.layers:
                for container in layer._modules.values():
                    if isinstance(container, nn.ModuleDict):
                        for entry in container._modules.values():
                            if entry is not None and entry.training:
                                entry.train(False)


@_gc_paused
def load_adapter_fast(
    peft_model: Any,
    model_id: str,
    name: str,
    is_trainable: bool,
    autocast_adapter_dtype: bool,
    low_cpu_mem_usage: bool,
) -> Any:
    from torch.nn.modules.module import _IncompatibleKeys

    host = _LoadAdapterHost(peft_model)
    host.active_before = list(peft_model.active_adapters)
    config = host.new_config(model_id, is_trainable=is_trainable)
    incoming = read_weights(model_id, name)
    if low_cpu_mem_usage:
        _check_low_cpu_placement(peft_model, autocast_adapter_dtype)
    token = AUTOCAST_ADAPTER_DTYPE.set(autocast_adapter_dtype)
    try:
        host.add_loaded(name, config, incoming, is_trainable=is_trainable, device=None, dtype=None)
    finally:
        AUTOCAST_ADAPTER_DTYPE.reset(token)
        incoming.done()
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _check_low_cpu_placement(model: nn.Module, autocast: bool) -> None:
    if autocast and any(p.dtype in _ROUNDED for p in model.parameters()):
        raise UnsupportedAdapterError(_LOW_CPU_ROUNDS)
