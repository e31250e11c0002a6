"""`fastadapter.save`: a drop-in for `PeftModel.save_pretrained` that writes the same bytes, faster.

What differs from PEFT is how, not what: tensors go from the model's memory to the file through the
Rust writer (parallel positional writes, GIL released, no intermediate copy), the adapter's tensors are
selected without building the whole model state_dict, and every file is staged beside its target and
renamed into place only once all of them are written, so a failed save leaves the previous files
exactly as they were.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import _core
from ._fileset import FileSet, StagedByCallback
from .errors import NotADirectoryPathError
from .names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

# torch is imported where it is used, not here: `import fastadapter` (and the torch-free conversion
# path, `fastadapter.convert` and the CLI) must not pay for or require it.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from ._write_ahead import WriteAheads
    from .hosts import AdapterHost

__all__ = ["adapter_files", "save"]


def save(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None = None,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
    *,
    fsync: bool = False,
    **kwargs: Any,
) -> None:
    """Save the adapters of `model` to `save_directory` exactly as `model.save_pretrained` would.

    `model` is a `peft.PeftModel` (files as `PeftModel.save_pretrained`: every adapter, "default" at the
    top and the others in `save_directory/<name>/`, PEFT's model card), a transformers model with
    adapters through its own integration (as its `save_pretrained`: the active adapter at the top, its
    generation config, no card), or a model fastadapter injected (no peft needed; fastadapter's own card).
    `adapter_model.safetensors` is byte-identical to the host's own. Arguments are PEFT's, with the same
    meaning; `save_embedding_layers="auto"` is decided without the network.
    `fsync=True` also makes the files durable (file and directory fsync) before returning.
    `kwargs["state_dict"]` is honoured as in PEFT; other keyword arguments (PEFT passes them to the Hub)
    are ignored.
    A model whose weights are DTensors (FSDP2, tensor parallel) is saved by calling this on every rank:
    each rank writes its own slices of `adapter_model.safetensors` in place and a main process publishes
    the files (`_sharded_save`: who publishes when several or no ranks pass `is_main_process=True`, and
    when the adapter is gathered instead).
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise NotADirectoryPathError(f"Provided path ({save_directory}) should be a directory, not a file")
    from ._sharded import sharded_parameter

    # Decided alike on every rank (the same model, the same arguments): the in-place write is collective.
    in_place = (
        safe_serialization
        and path_initial_model_for_weight_conversion is None
        and sharded_parameter(model) is not None
    )
    planned = adapter_files(
        model,
        save_directory,
        selected_adapters,
        save_embedding_layers,
        is_main_process=is_main_process,
        state_dict=kwargs.get("state_dict"),
        path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
        gather=not in_place,
    )
    if is_main_process:
        os.makedirs(save_directory, exist_ok=True)
    if in_place:
        from ._sharded_save import save_sharded

        save_sharded(planned, save_directory, is_main_process, fsync)
        return
    ahead = None
    if is_main_process and safe_serialization and path_initial_model_for_weight_conversion is None:
        from ._write_ahead import WriteAheads
        from .hosts import host_for

        # Started before the selection runs (the generator runs it as save_planned consumes it).
        layout = host_for(model).save_layout(selected_adapters)
        weights = [os.path.join(subdir, ADAPTER_WEIGHTS) for _, subdir in layout]
        ahead = WriteAheads(model, save_directory, weights, fsync)
    save_planned(planned, save_directory, safe_serialization, fsync, ahead)


def save_planned(
    planned: Iterator[PlannedFile],
    save_directory: str,
    safe_serialization: bool,
    fsync: bool,
    ahead: WriteAheads | None = None,
) -> None:
    """Stage every planned file, then publish them all: the main process's part of a save. For sharded
    weights `planned` must come from `adapter_files(gather=True)`: every rank gathers the adapter.
    `ahead`: weights files already being written from the model's last save, used where the selection
    gives the same tensors."""
    with FileSet() as files, ahead or contextlib.nullcontext():
        for relative, payload in planned:
            target = os.path.join(save_directory, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if isinstance(payload, bytes):
                files.stage_bytes(target, payload, fsync)
            elif safe_serialization:
                written = ahead.take(relative, payload) if ahead is not None else None
                if written is not None:
                    files.add(written, large=True)
                else:
                    stage_weights(files, target, payload, fsync)
                if ahead is not None:
                    ahead.remember(relative, payload)
            else:
                _stage_bin(files, target, payload)


# What one adapter save consists of: (path relative to the save directory, content); weights are
# given as the state dict under the safetensors name, the caller decides how to serialise them.
PlannedFile = tuple[str, "dict[str, torch.Tensor] | bytes"]


def adapter_files(
    model: nn.Module,
    save_directory: str,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
    gather: bool = True,
) -> Iterator[PlannedFile]:
    """The files `save` writes for `model`, as its host's own `save_pretrained` writes them, without
    writing anything: the side files (PEFT's model card, transformers' generation config), then for each
    adapter its weights and its adapter_config.json. `fastadapter.save` stages them; the Checkpointer
    snapshots them. Consume it fully: the host's side effects (PEFT fills the config's
    base_model_name_or_path) happen as the files are produced, and on non-main processes it still
    computes every state dict (a collective for sharded models) but yields no file. The model and
    `selected_adapters` are checked before this returns.
    `gather=False` (not with a weight conversion): sharded weights are yielded as they are (DTensors),
    nothing is gathered, and non-main processes yield their weights too (only those), for the
    in-place write in which every rank writes its own slices."""
    from .hosts import host_for

    if not gather and path_initial_model_for_weight_conversion is not None:
        raise ValueError("a weight conversion subtracts from the full tensors: it needs gather=True")
    host = host_for(model)
    layout = host.save_layout(selected_adapters)
    return _adapter_files(
        host,
        save_directory,
        layout,
        save_embedding_layers,
        is_main_process,
        state_dict,
        path_initial_model_for_weight_conversion,
        gather,
    )


def _adapter_files(
    host: AdapterHost,
    save_directory: str,
    layout: list[tuple[str, str]],
    save_embedding_layers: bool | str,
    is_main_process: bool,
    state_dict: dict[str, torch.Tensor] | None,
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None,
    gather: bool,
) -> Iterator[PlannedFile]:
    from ._peft_state import resolve_save_embedding_layers

    if is_main_process:
        yield from host.side_files(save_directory)
    configs = host.configs()
    for name, subdir in layout:
        config = configs[name]
        embeddings = resolve_save_embedding_layers(host.model, config, save_embedding_layers)
        weights = host.adapter_state_dict(name, embeddings, state_dict)
        if gather:
            weights = _unsharded(weights)
        if not is_main_process:
            os.makedirs(os.path.join(save_directory, subdir), exist_ok=True)  # as PEFT does on every rank
            if not gather:
                yield os.path.join(subdir, ADAPTER_WEIGHTS), weights
            continue
        converting = path_initial_model_for_weight_conversion is not None
        if converting:
            from ._initial_conversion import check_convertible, subtract_initial

            check_convertible(config)
            initial = os.fspath(path_initial_model_for_weight_conversion)  # type: ignore[arg-type]
            weights = subtract_initial(weights, initial)
        yield os.path.join(subdir, ADAPTER_WEIGHTS), weights

        # PEFT fills an unset base_model_name_or_path on the model's own config (not on the copy it
        # saves when converting); later saves, and their "auto" embedding decision, see it.
        filled = host.base_model_name_or_path(config)
        if not converting:
            config.base_model_name_or_path = filled
        saved = config if not converting else _with_base(config, filled)
        yield os.path.join(subdir, ADAPTER_CONFIG), host.config_json(saved, converted_from_initial=converting)


# Device types whose tensors are packed into a pinned snapshot buffer (asynchronous copies on a side
# stream, one synchronisation) instead of being copied to the host one by one. Tests add "cpu" to run
# the same path without a GPU.
SNAPSHOT_DEVICE_TYPES = frozenset({"cuda"})
_SNAPSHOT_LOCK = threading.Lock()
_SNAPSHOT_BUFFER: Any = None


def stage_weights(files: FileSet, target: str, state_dict: dict[str, torch.Tensor], fsync: bool) -> None:
    if any(t.device.type in SNAPSHOT_DEVICE_TYPES for t in state_dict.values()):
        _stage_packed(files, target, state_dict, fsync)
        return
    from ._tensors import write_records

    files.add(_core.write_safetensors(target, write_records(state_dict), {"format": "pt"}, fsync), large=True)


def _stage_packed(files: FileSet, target: str, state_dict: dict[str, torch.Tensor], fsync: bool) -> None:
    """The file's bytes packed into one reusable (pinned) host buffer, then written from there: one
    synchronisation for all device tensors instead of one pageable copy per tensor."""
    global _SNAPSHOT_BUFFER
    from ._snapshot import SnapshotBuffer, take

    with _SNAPSHOT_LOCK:  # one buffer for the process: saves from several threads take turns
        if _SNAPSHOT_BUFFER is None:
            _SNAPSHOT_BUFFER = SnapshotBuffer()
        view, (image,) = take(_SNAPSHOT_BUFFER, [(target, state_dict, {"format": "pt"})])
        files.add(_core.stage_bytes(target, view[image.start : image.end].numpy().data, fsync), large=True)


def _stage_bin(files: FileSet, safetensors_target: str, state_dict: dict[str, torch.Tensor]) -> None:
    import torch

    target = os.path.join(os.path.dirname(safetensors_target), ADAPTER_WEIGHTS_BIN)
    # PEFT pickles `model.state_dict()`'s values: plain tensors. The fast selection holds the parameters
    # themselves, which torch.save would pickle as `nn.Parameter` (and `torch.load` return as such).
    # `detach()` is what `state_dict()` does: same storage, no copy.
    plain = {k: v.detach() if isinstance(v, torch.nn.Parameter) else v for k, v in state_dict.items()}
    files.add(StagedByCallback(target, lambda path: torch.save(plain, path)), large=True)


def _unsharded(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded adapter weights (DTensors: FSDP2, tensor parallel) as the full tensors PEFT saves for the
    unsharded model. Gathering is a collective, so every rank does it, main process or not; only the
    adapter is gathered (small next to the model), never the base model."""
    from ._sharded import full_tensors

    return full_tensors(weights)


def _with_base(config: Any, base: str | None) -> Any:
    import copy

    out = copy.copy(config)
    out.base_model_name_or_path = base
    return out
