"""Reading an adapter directory's weights: the first stage of a load.

safetensors files are mapped once (copy-on-write: writing to a loaded weight never reaches the file) and
the Rust core selects and renames the adapter's keys from the header alone; `.bin` files go through
torch's safe unpickler, memory-mapped. Either way the result is keyed as the model tree holds the
weights (`x.lora_A.<name>.weight`), so later stages never see PEFT's file keys.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ._core import SafetensorsFile, select_keys
from ._tensors import mapped_tensors
from .errors import TargetModuleError, TensorError
from .names import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, PEFT_PREFIX


@dataclass
class Incoming:
    """An adapter file's tensors, keyed as the model holds them for one adapter name."""

    where: str  # the file, for messages
    tensors: dict[str, torch.Tensor]
    mapped: SafetensorsFile | None  # the private mapping the tensors view (safetensors), or None
    cold: bool = False  # some of the file was not in memory: its prefetch reads it from disk

    def ready(self) -> None:
        """The load is over: the prefetch of the mapping's pages ends (the tensors stay valid). One that
        found the file out of the page cache reads it to the end first, so the weights are in memory
        when the load returns; its error (the file shrank under the mapping, a disk error) is raised
        here as `OSError` naming the file, where touching the weights would have crashed the process."""
        if self.mapped is not None:
            self.mapped.stop_prefetch()

    def done(self) -> None:
        """`ready`, for `finally` blocks: the prefetch's error is not raised."""
        with contextlib.suppress(OSError):
            self.ready()


def renames(name: str) -> list[tuple[str, str]]:
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


def select_records(file: SafetensorsFile, name: str) -> list[tuple[str, str, list[int], int, int]]:
    """The safetensors file's tensors for adapter `name`, each key as the model holds it; refused when a
    tensor is not under PEFT's prefix."""
    records = file.select(prefix=PEFT_PREFIX, renames=renames(name))
    _check_all_selected(str(file.path), len(records), len(file), lambda: (e[0] for e in file.entries()))
    return records


def read_weights(adapter_dir: str, name: str) -> Incoming:
    """The adapter's tensors for adapter name `name`. safetensors tensors are views of one private mapping
    whose pages a background thread maps in while the caller builds the layers (on another core), until
    `Incoming.ready()`: every page it reached costs no fault later. Pages not in the page cache are read
    by several threads at once (the core's `prefetch`), to the end of the file."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        file = SafetensorsFile(path)
        records = select_records(file, name)
        cold = file.prefetch()
        return Incoming(path, mapped_tensors(file, records), file, cold)
    bin_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(bin_path):
        loaded = read_bin(bin_path)
        pairs = select_keys(list(loaded), prefix=PEFT_PREFIX, renames=renames(name))
        _check_all_selected(bin_path, len(pairs), len(loaded), lambda: loaded)
        return Incoming(bin_path, {new: loaded[old] for old, new in pairs}, None)
    raise FileNotFoundError(
        2, f"no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN} in the adapter directory", path
    )


def read_file_tensors(adapter_dir: str) -> Incoming:
    """The adapter file's tensors keyed as in the file (`base_model.model.` prefix, no adapter name): what
    a load into an existing adapter matches against the adapter's saved keys."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        file = SafetensorsFile(path)
        return Incoming(path, mapped_tensors(file, file.entries()), file)
    bin_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(bin_path):
        return Incoming(bin_path, read_bin(bin_path), None)
    raise FileNotFoundError(
        2, f"no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN} in the adapter directory", path
    )
