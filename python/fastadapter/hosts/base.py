"""What every adapter host answers: the one interface `save`, `load`, `Checkpointer` and the management
functions go through, whoever owns the model's adapters (a PeftModel, transformers' integration, or
fastadapter itself)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from ..errors import AdapterNotFoundError
from ..names import DEFAULT_ADAPTER, PEFT_PREFIX

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .._read import Incoming


class AdapterHost(ABC):
    """One model's adapters, seen through the API of whoever owns them."""

    kind: ClassVar[str]  # "peft" | "transformers" | "fastadapter": what `host_for` decided
    # The host's own `save_pretrained` writes a model card (README.md) beside the adapters.
    writes_model_card: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- what exists ------------------------------------------------------------------------------------

    @abstractmethod
    def configs(self) -> dict[str, Any]:
        """Adapter name -> its config (peft's `LoraConfig`, or fastadapter's `AdapterConfig`), in order."""

    @abstractmethod
    def active_adapters(self) -> list[str]: ...

    def require(self, name: str) -> Any:
        configs = self.configs()
        if name not in configs:
            raise AdapterNotFoundError(f"unknown adapter {name!r}; the model has {list(configs)}")
        return configs[name]

    # --- saving -----------------------------------------------------------------------------------------

    def save_layout(self, selected: Sequence[str] | None) -> list[tuple[str, str]]:
        """(adapter name, sub-directory) of each adapter a save writes: PEFT's layout, every adapter unless
        `selected`, "default" at the top and the others in a folder of their name."""
        configs = self.configs()
        if not configs:
            raise AdapterNotFoundError(f"{type(self.model).__name__} has no adapter to save")
        names = list(configs) if selected is None else _checked_selection(configs, selected)
        return [(name, "" if name == DEFAULT_ADAPTER else name) for name in names]

    @abstractmethod
    def adapter_state_dict(
        self, name: str, save_embeddings: bool, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors saved for adapter `name`, keyed as in the file (`base_model.model.` prefix)."""

    @abstractmethod
    def config_json(self, config: Any, *, converted_from_initial: bool = False) -> bytes:
        """The bytes of `adapter_config.json` for `config`."""

    @abstractmethod
    def base_model_name_or_path(self, config: Any) -> str | None:
        """What the host's save fills into an unset `base_model_name_or_path` (None: it fills nothing)."""

    def side_files(self, save_directory: str) -> list[tuple[str, bytes]]:
        """Files the host's save writes beside the adapters (model card, generation config)."""
        return []

    # --- loading ----------------------------------------------------------------------------------------

    @abstractmethod
    def new_config(self, adapter_dir: str, *, is_trainable: bool) -> Any:
        """The config a new adapter loaded from `adapter_dir` is registered with."""

    @abstractmethod
    def add_loaded(
        self,
        name: str,
        config: Any,
        incoming: Incoming,
        *,
        is_trainable: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Register a new adapter built from the file's tensors; nothing changes if this raises."""

    def load_into(self, name: str, config: Any, file: Incoming) -> None:
        """PEFT's `load_adapter` into an existing name: the file's tensors (keyed as in the file) replace
        adapter `name`'s weights in place (same parameters, same storage: optimizers and hooks that hold
        them keep working); a sharded weight (FSDP2, tensor parallel) receives only this rank's slice.
        Every tensor is checked first; only then is anything copied. `config` (the file's) is kept for the
        adapter, its scaling applied, so that what is saved next is what is loaded."""
        import torch

        from .._sharded import check_local_slice, copy_into, to_sharded_state
        from ..errors import MissingTensorError, TargetModuleError, TensorError

        old = self.require(name)
        to_sharded_state(self.model)
        # Embedding weights saved with the adapter (save_embedding_layers) are loaded too, where the model
        # can say which layers are its embeddings.
        live = self.adapter_state_dict(name, save_embeddings=hasattr(self.model, "get_input_embeddings"))
        for key, value in file.tensors.items():
            target = live.get(key)
            if target is None:
                raise TargetModuleError(
                    f"{file.where}: tensor `{key}` has no counterpart in the model's adapter `{name}`"
                )
            if target.shape != value.shape:
                module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
                raise TensorError(
                    f"{file.where}: tensor `{key}` for module `{module}` has shape {list(value.shape)}, but "
                    f"the model's adapter `{name}` has {list(target.shape)} there"
                )
            check_local_slice(key, target)
        missing = next((k for k in live if k not in file.tensors and _is_lora_key(k)), None)
        if missing is not None:
            raise MissingTensorError(f"{file.where}: no tensor `{missing}` for the model's adapter `{name}`")
        config.inference_mode = old.inference_mode
        with torch.no_grad():
            for key, value in file.tensors.items():
                copy_into(live[key], value, key)
        self.configs()[name] = config
        _rescale(self.model, name, config)

    # --- managing ---------------------------------------------------------------------------------------

    @abstractmethod
    def set_adapter(self, names: str | Sequence[str]) -> None: ...

    @abstractmethod
    def delete_adapter(self, name: str) -> None: ...

    @abstractmethod
    def unload(self) -> nn.Module: ...

    @abstractmethod
    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module: ...


_LORA_KEY_PARTS = (".lora_A", ".lora_B", ".lora_embedding_", ".lora_magnitude_vector")


def _is_lora_key(key: str) -> bool:
    return any(part in key for part in _LORA_KEY_PARTS)


def _rescale(model: nn.Module, name: str, config: Any) -> None:
    """Each LoRA layer's alpha and scaling for adapter `name` as `config` gives them (PEFT's
    `alpha_pattern` / `rank_pattern` rules)."""
    import math

    from .._inject import pattern_key

    alpha_pattern = config.alpha_pattern or {}
    for path, layer in model.named_modules():
        r = getattr(layer, "r", None)
        if not isinstance(r, dict) or name not in r or not isinstance(getattr(layer, "scaling", None), dict):
            continue
        path = path.removeprefix("base_model.model.")
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, path), config.lora_alpha)
        rank = r[name]
        layer.lora_alpha[name] = alpha
        layer.scaling[name] = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _checked_selection(configs: dict[str, Any], selected: Sequence[str]) -> list[str]:
    if isinstance(selected, str):
        selected = [selected]
    unknown = [name for name in selected if name not in configs]
    if unknown:
        raise AdapterNotFoundError(
            f"unknown adapter(s) {unknown} in selected_adapters; the model has {list(configs)}"
        )
    return list(selected)


def rendered(write: Any, name: str) -> bytes:
    """The bytes a peer's own `save_pretrained(directory)` writes as `name`, rendered in a scratch
    directory so that nothing in the real one changes before every file of the save is staged."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastadapter-render-") as scratch:
        write(scratch)
        with open(os.path.join(scratch, name), "rb") as f:
            return f.read()


# What a load changes besides the module tree (PEFT's injection, activation): train/eval flags and
# requires_grad, kept to undo a load that fails after it changed the model.
Trainability: TypeAlias = "tuple[list[tuple[nn.Module, bool]], list[tuple[nn.Parameter, bool]]]"


def trainability(model: nn.Module) -> Trainability:
    return [(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()]


def restore_trainability(saved: Trainability) -> None:
    modules, params = saved
    for module, training in modules:
        module.training = training
    for param, requires_grad in params:
        param.requires_grad_(requires_grad)
