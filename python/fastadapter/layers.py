"""fastadapter's own LoRA layers: the forward pass of peft 0.21's `lora.Linear` / `lora.Embedding`, op for op.

The module tree mirrors PEFT's (`base_layer`, `lora_A.<name>`, `lora_B.<name>`, `lora_embedding_A.<name>`,
`lora_magnitude_vector.<name>.weight`, `modules_to_save.<name>`), so a model's `state_dict()` has PEFT's keys
without the `base_model.model.` prefix, and outputs are bit-identical to PEFT's in fp32: the same operations
run in the same order with the same dtype casts. What differs is construction: a loaded adapter's modules
are built around the loaded tensors directly (no initialisation that would be overwritten), and dropout is
`F.dropout` driven by the layer's own training flag instead of one `nn.Dropout` module per adapter.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "ModulesToSave", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2), recognised without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _module_state() -> dict[str, Any]:
    """Fresh copies of what `nn.Module.__init__` sets (torch 2.x), as one dict display."""
    return {
        "training": True,
        "_parameters": {},
        "_buffers": {},
        "_non_persistent_buffers_set": set(),
        "_backward_pre_hooks": OrderedDict(),
        "_backward_hooks": OrderedDict(),
        "_is_full_backward_hook": None,
        "_forward_hooks": OrderedDict(),
        "_forward_hooks_with_kwargs": OrderedDict(),
        "_forward_hooks_always_called": OrderedDict(),
        "_forward_pre_hooks": OrderedDict(),
        "_forward_pre_hooks_with_kwargs": OrderedDict(),
        "_state_dict_hooks": OrderedDict(),
        "_state_dict_pre_hooks": OrderedDict(),
        "_load_state_dict_pre_hooks": OrderedDict(),
        "_load_state_dict_post_hooks": OrderedDict(),
        "_modules": {},
    }


def _matches_this_torch() -> bool:
    probe = nn.Module().__dict__
    ours = _module_state()
    return probe.keys() == ours.keys() and all(
        type(probe[k]) is type(v) and probe[k] == v for k, v in ours.items()
    )


# Checked once against the installed torch: any difference (a torch that adds a field) and every module
# is initialised by torch itself.
_FAST_INIT = _matches_this_torch()


def init_module(m: nn.Module) -> None:
    """`nn.Module.__init__(m)` at a third of the cost (measured: 5120 modules, 15.3 ms against 5.7 ms): a
    load builds five modules per LoRA layer, thousands in all, and torch's `__init__` sets its 17 fields
    one `object.__setattr__` call at a time (and logs API usage)."""
    if _FAST_INIT:
        m.__dict__.update(_module_state())
    else:
        nn.Module.__init__(m)


def empty_module_dict() -> nn.ModuleDict:
    """`nn.ModuleDict()` through `init_module`."""
    m = nn.ModuleDict.__new__(nn.ModuleDict)
    init_module(m)
    return m


def empty_parameter_dict() -> nn.ParameterDict:
    """`nn.ParameterDict()` through `init_module` (its __init__ also sets `_keys`, the key order)."""
    m = nn.ParameterDict.__new__(nn.ParameterDict)
    init_module(m)
    m.__dict__["_keys"] = {}
    return m


def fast_linear(weight: nn.Parameter, bias: nn.Parameter | None = None) -> nn.Linear:
    """An `nn.Linear` around existing parameters, skipping `__init__`'s allocation and random init."""
    m = nn.Linear.__new__(nn.Linear)
    init_module(m)
    # Plain attributes go straight to __dict__: nn.Module.__setattr__ costs microseconds per call,
    # which adds up over thousands of layers.
    m.__dict__["out_features"], m.__dict__["in_features"] = weight.shape
    m._parameters["weight"] = weight
    m._parameters["bias"] = bias
    return m


class DoraMagnitude(nn.Module):
    """PEFT's `DoraLinearLayer`: holds the magnitude vector as `.weight`."""

    def __init__(self, weight: nn.Parameter, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight

    def get_weight_norm(
        self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        weight = weight.T if self.fan_in_fan_out else weight
        weight = weight + scaling * lora_weight
        norm: torch.Tensor = torch.linalg.norm(weight, dim=1).to(weight.dtype)
        return norm

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: nn.Linear,
        lora_B: nn.Linear,
        scaling: float,
        base_layer: Any,
        base_result: torch.Tensor | None,
    ) -> torch.Tensor:
        x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        lora_weight = lora_B(lora_A(x_eye)).T
        lora_weight = lora_weight.to(x.dtype)
        magnitude = self.weight
        weight = base_layer.weight.to(x.dtype)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = (magnitude / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            bias = base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            base_result = F.linear(x, weight.T if self.fan_in_fan_out else weight)
        out: torch.Tensor = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
        return out


class LoraLayer(nn.Module):
    """What the linear and embedding layers share: the wrapped base layer and per-adapter settings."""

    # Where the adapter tensors live; every one is a ModuleDict/ParameterDict keyed by adapter name.
    adapter_layer_names: tuple[str, ...] = ()

    base_layer: Any
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    use_rslora: dict[str, bool]
    dropout_p: dict[str, float]
    active_adapters: list[str]
    disable_adapters: bool
    # PEFT's layers list their merged adapters here. These never hold one: only `unload(merge=True)`
    # merges, and it replaces the layer by its base. A class attribute, so a hotswap's check of every
    # layer finds it without nn.Module's failing __getattr__.
    merged_adapters: tuple[str, ...] = ()

    def __init__(self, base_layer: Any) -> None:
        init_module(self)
        self._modules["base_layer"] = base_layer
        # Plain attributes straight into __dict__ (see fast_linear).
        self.__dict__.update(
            r={},
            lora_alpha={},
            scaling={},
            use_rslora={},
            dropout_p={},
            active_adapters=[],
            disable_adapters=False,
        )

    def get_base_layer(self) -> nn.Module:
        base: nn.Module = self.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:  # transformers reads e.g. `lm_head.weight` of a wrapped layer
        w: torch.Tensor = self.base_layer.weight
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        b: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        return b

    def set_settings(self, name: str, r: int, alpha: float, use_rslora: bool, dropout: float) -> None:
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.use_rslora[name] = use_rslora
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p[name] = dropout

    def adapters(self) -> list[str]:
        return list(self.r)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        modules = self._modules
        for attr in self.adapter_layer_names:
            container = modules.get(attr)
            if container is None:
                continue
            param = container._parameters.get(name)
            if param is not None:
                yield param
                continue
            item = container._modules.get(name)
            if item is not None:
                # lora_A / lora_B / magnitude modules hold their tensors directly.
                yield from (p for p in item._parameters.values() if p is not None)

    def delete_adapter(self, name: str) -> None:
        for attr in self.adapter_layer_names:
            container = self._modules.get(attr)
            if container is not None:
                container._modules.pop(name, None)
                container._parameters.pop(name, None)
        settings: tuple[dict[str, Any], ...] = (
            self.r,
            self.lora_alpha,
            self.scaling,
            self.use_rslora,
            self.dropout_p,
        )
        for values in settings:
            values.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout_p[name]
        # PEFT uses nn.Identity for p == 0 and nn.Dropout(p) otherwise: the same calls.
        return F.dropout(x, p, self.training) if p > 0.0 else x

    def merge(self, names: Iterable[str]) -> None:
        raise NotImplementedError


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` and transformers' `Conv1D` (weight stored transposed: fan_in_fan_out)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    fan_in_fan_out: bool
    is_target_conv_1d_layer: bool
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict

    def __init__(self, base_layer: Any, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.__dict__.update(fan_in_fan_out=fan_in_fan_out, is_target_conv_1d_layer=is_conv1d(base_layer))
        self._modules["lora_A"] = empty_module_dict()
        self._modules["lora_B"] = empty_module_dict()

    @property
    def dora(self) -> nn.ModuleDict | None:
        return self._modules.get("lora_magnitude_vector")  # type: ignore[return-value]

    def add(
        self,
        name: str,
        lora_A: nn.Linear,
        lora_B: nn.Linear,
        magnitude: DoraMagnitude | None = None,
    ) -> None:
        modules = self._modules  # past nn.Module.__getattr__: this runs once per layer of a load
        modules["lora_A"]._modules[name] = lora_A  # type: ignore[union-attr]
        modules["lora_B"]._modules[name] = lora_B  # type: ignore[union-attr]
        if magnitude is not None:
            if self.dora is None:
                self.lora_magnitude_vector = nn.ModuleDict()
            self.lora_magnitude_vector._modules[name] = magnitude

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        torch_result_dtype = result.dtype
        lora_A_keys = self.lora_A._modules
        dora = self.dora
        for active in self.active_adapters:
            if active not in lora_A_keys:
                continue
            lora_A: nn.Linear = self.lora_A._modules[active]  # type: ignore[assignment]
            lora_B: nn.Linear = self.lora_B._modules[active]  # type: ignore[assignment]
            scaling = self.scaling[active]
            if x.dtype != lora_A.weight.dtype:
                x = x.to(dtype=lora_A.weight.dtype)
            if dora is None or active not in dora._modules:
                result = result + lora_B(lora_A(self._dropout(active, x))) * scaling
            else:
                # peft's DoraLinearVariant.forward
                if self.dropout_p[active] == 0.0 or not self.training:
                    base_result: torch.Tensor | None = result
                else:
                    x = self._dropout(active, x)
                    base_result = None
                magnitude: DoraMagnitude = dora._modules[active]  # type: ignore[assignment]
                result = result + magnitude(
                    x,
                    lora_A=lora_A,
                    lora_B=lora_B,
                    scaling=scaling,
                    base_layer=self.base_layer,
                    base_result=base_result,
                )
        return result.to(torch_result_dtype)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        lora_A: Any = self.lora_A[name]
        lora_B: Any = self.lora_B[name]
        weight_A: torch.Tensor = lora_A.weight
        weight_B: torch.Tensor = lora_B.weight
        dtype = weight_B.dtype
        # peft: half-precision matmuls are slow on some CPUs, so merge in fp32 there and cast back.
        cast_to_fp32 = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = weight_B @ weight_A
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling[name]
        return delta.to(dtype) if cast_to_fp32 else delta

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        base = self.base_layer
        original = None
        for name in names:
            if name not in self.lora_A._modules:
                continue
            delta = self.get_delta_weight(name)
            dora = self.dora
            if dora is not None and name in dora._modules:
                if original is None:
                    original = base.weight.detach().clone()
                magnitude: DoraMagnitude = dora._modules[name]  # type: ignore[assignment]
                weight_norm = magnitude.get_weight_norm(
                    original, delta.T if self.fan_in_fan_out else delta, 1
                ).detach()
                factor = (magnitude.weight / weight_norm).view(-1, 1)
                factor = factor.T if self.fan_in_fan_out else factor
                new_weight = factor * (base.weight.data + delta)
                base.weight.data = new_weight.to(base.weight.dtype)
            else:
                if original is None:
                    original = base.weight.detach().clone()
                base.weight.data += delta
            lora_B: Any = self.lora_B[name]
            lora_bias = lora_B.bias
            if lora_bias is not None:
                base.bias.data += lora_bias * self.scaling[name]


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (dim, r)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    lora_embedding_A: nn.ParameterDict
    lora_embedding_B: nn.ParameterDict

    def __init__(self, base_layer: Any) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = False
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add(self, name: str, weight_A: nn.Parameter, weight_B: nn.Parameter) -> None:
        self.lora_embedding_A._parameters[name] = weight_A
        self.lora_embedding_B._parameters[name] = weight_B

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            x,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _embed_scale(self) -> torch.Tensor | None:
        base = self.base_layer
        scale = getattr(base, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        torch_result_dtype = result.dtype
        embed_scale = self._embed_scale()
        params_A = self.lora_embedding_A._parameters
        for active in self.active_adapters:
            if active not in params_A:
                continue
            embedding_A = self.lora_embedding_A[active].T
            embedding_B = self.lora_embedding_B[active].T
            after_A = self._embed(x, embedding_A)
            adapter_output = (after_A @ embedding_B) * self.scaling[active]
            if embed_scale is not None:
                adapter_output = adapter_output * embed_scale.to(adapter_output.dtype)
            result = result + adapter_output
        return result.to(torch_result_dtype)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        weight_A: torch.Tensor = self.lora_embedding_A[name]
        weight_B: torch.Tensor = self.lora_embedding_B[name]
        dtype = weight_A.dtype
        cast_to_fp32 = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = (weight_B @ weight_A).T * self.scaling[name]
        return delta.to(dtype) if cast_to_fp32 else delta

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        weight = self.base_layer.weight
        for name in names:
            if name in self.lora_embedding_A._parameters:
                weight.data += self.get_delta_weight(name).to(weight.dtype)


class ModulesToSave(nn.Module):
    """PEFT's `ModulesToSaveWrapper`: a trainable copy of a module per adapter; the active adapter's copy
    runs, the original when none is active. Saved as `<path>.<param>` like PEFT."""

    original_module: Any
    modules_to_save: nn.ModuleDict

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def adapters(self) -> list[str]:
        return list(self.modules_to_save._modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active_adapter is None or self.active_adapter not in self.modules_to_save._modules:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__["_modules"]
        active = self.__dict__.get("active_adapter")
        if active is not None and active in modules["modules_to_save"]._modules:
            return getattr(modules["modules_to_save"][active], name)
        return getattr(modules["original_module"], name)

    # What `_peft_state` asks of an auxiliary wrapper (PEFT's `adapter_state_dict`).
    def adapter_state_dict(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if adapter_name not in self.modules_to_save._modules:
            return {}
        prefix = f"modules_to_save.{adapter_name}."
        return {k: state_dict[prefix + k] for k in self.modules_to_save[adapter_name].state_dict()}

    @staticmethod
    def empty_copy(module: nn.Module) -> nn.Module:
        """A deep copy whose parameters are on the meta device (no bytes copied): filled by the caller."""
        memo: dict[int, Any] = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()
        }
        return copy.deepcopy(module, memo)
