"""A repeated save writes its weights file from the last save's tensors while it selects them
(`_write_ahead`): whatever changed between the saves, the files are PEFT's for the model as it is.

Each case saves once (so the next save writes ahead), changes the model, saves again with fastadapter
and with PEFT, and compares every file. `taken` says what became of the early write: kept (a change it
had to see through: the records are taken at each save), discarded (the comparison caught the change),
or never started (a tensor the last save held is gone).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn

import fastadapter
from fastadapter import Checkpointer, _write_ahead
from helpers import (
    SAFETENSORS,
    add_perturbed_adapter,
    assert_same_files,
    leftovers,
    lora_config,
    make_peft,
    save_with_peft,
    tiny_llama,
)

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def _lora_a(model: PeftModel) -> nn.Linear:
    a: nn.Linear = model.get_submodule(Q_PROJ).lora_A["default"]
    return a


def replace_parameter(model: PeftModel) -> None:
    a = _lora_a(model)
    a.weight = nn.Parameter(torch.full_like(a.weight, 0.25))


def swap_data(model: PeftModel) -> None:  # the same Parameter object, other memory
    a = _lora_a(model)
    a.weight.data = torch.full_like(a.weight, -0.5)


def change_in_place(model: PeftModel) -> None:
    with torch.no_grad():
        _lora_a(model).weight.mul_(3)


def remove_a_lora_layer(model: PeftModel) -> None:
    attn = model.get_submodule("base_model.model.model.layers.1.self_attn")
    attn.q_proj = attn.q_proj.get_base_layer()


def add_an_adapter(model: PeftModel) -> None:
    add_perturbed_adapter(model, "second", lora_config(), seed=5)


def delete_the_other_adapter(model: PeftModel) -> None:
    model.delete_adapter("second")


def save_biases(model: PeftModel) -> None:
    model.peft_config["default"].bias = "all"


def hook_the_state_dict(model: PeftModel) -> None:
    def scale(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        for key in state:
            if key.endswith("lora_A.default.weight"):
                state[key] = state[key] * 2

    model.get_submodule(Q_PROJ).register_state_dict_post_hook(scale)


def train_a_step(model: PeftModel) -> None:  # what happens between the saves of a training run
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(torch.randint(1, 50, (2, 5))).logits.sum().backward()
    optimizer.step()
    model.eval()


# change -> what becomes of the early write of "default": kept (the same tensor objects selected again),
# discarded (the selection differs), or never started (a tensor the last save held is gone).
CHANGES: dict[str, tuple[Callable[[PeftModel], None], list[bool]]] = {
    "nothing": (lambda model: None, [True]),
    "train_a_step": (train_a_step, [True]),
    "change_in_place": (change_in_place, [True]),
    "swap_data": (swap_data, [True]),
    "add_an_adapter": (add_an_adapter, [True]),
    "delete_the_other_adapter": (delete_the_other_adapter, [True]),
    "save_biases": (save_biases, [False]),
    "hook_the_state_dict": (hook_the_state_dict, [False]),
    "replace_parameter": (replace_parameter, []),
    "remove_a_lora_layer": (remove_a_lora_layer, []),
}


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For every weights file written ahead: whether the save kept it."""
    seen: list[bool] = []
    take = _write_ahead._Ahead.take

    def spy(self: Any, weights: Any) -> Any:
        pending = take(self, weights)
        seen.append(pending is not None)
        return pending

    monkeypatch.setattr(_write_ahead._Ahead, "take", spy)
    return seen


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("fsync", [False, True])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_save_after_a_change_writes_what_peft_writes(
    tmp_path: Path, taken: list[bool], change: str, fsync: bool
) -> None:
    make_change, kept = CHANGES[change]
    base = tiny_llama(attention_bias=True)  # biases, for bias="all"
    model = make_peft(base, lora_config(target_modules=["q_proj", "v_proj", "o_proj"]))
    if change == "delete_the_other_adapter":
        add_an_adapter(model)
    fastadapter.save(model, tmp_path / "first", fsync=fsync)
    assert taken == []  # nothing to write ahead from on the first save
    make_change(model)
    fastadapter.save(model, tmp_path / "ours", fsync=fsync)
    save_with_peft(model, tmp_path / "peft")
    assert taken[:1] == kept, taken
    keys = assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert keys[SAFETENSORS], "no weights compared"
    assert leftovers(tmp_path / "ours") == []
    # And saving again over those files (the model unchanged now) still gives PEFT's bytes.
    fastadapter.save(model, tmp_path / "peft", fsync=fsync)
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
    assert leftovers(tmp_path / "peft") == []


# With a second adapter (in a subdirectory) the sync Checkpointer takes the snapshot path: not here.
ONE_ADAPTER = sorted(c for c in CHANGES if c not in ("add_an_adapter", "delete_the_other_adapter"))


@pytest.mark.parametrize("change", ONE_ADAPTER)
def test_a_sync_checkpoint_after_a_change_holds_what_peft_writes(
    tmp_path: Path, taken: list[bool], change: str
) -> None:
    # Checkpointer(async_save=False) writes the adapter's weights ahead into its staging directory.
    make_change, kept = CHANGES[change]
    model = make_peft(tiny_llama(attention_bias=True), lora_config(target_modules=["q_proj", "o_proj"]))
    ck = Checkpointer(tmp_path / "ck", async_save=False, fsync=False)
    ck.save(1, model)
    make_change(model)
    ck.save(2, model)
    assert taken[:1] == kept, taken
    save_with_peft(model, tmp_path / "peft")
    assert (Path(ck.path(2)) / SAFETENSORS).read_bytes() == (tmp_path / "peft" / SAFETENSORS).read_bytes()
    assert leftovers(tmp_path / "ck") == []


def test_a_failing_selection_leaves_no_file_written_ahead(
    tmp_path: Path, taken: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_peft(tiny_llama(), lora_config())
    fastadapter.save(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    from fastadapter.hosts.peft_model import PeftHost

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("selection failed")

    monkeypatch.setattr(PeftHost, "adapter_state_dict", fail)
    with pytest.raises(RuntimeError, match="selection failed"):
        fastadapter.save(model, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path / "out") == []
    assert taken == []  # the early write was discarded, never offered


def test_selections_of_new_tensors_are_not_written_ahead(tmp_path: Path, taken: list[bool]) -> None:
    # A caller's state dict (PEFT's path): new tensor objects on every save would never match.
    model = make_peft(tiny_llama(), lora_config())
    for i in range(3):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        fastadapter.save(model, tmp_path / str(i), state_dict=state)
    assert taken == []
    save_with_peft(model, tmp_path / "peft")
    assert_same_files(tmp_path / "2", tmp_path / "peft")


def test_a_held_tensor_that_cannot_be_written_now_is_not_an_error(tmp_path: Path, taken: list[bool]) -> None:
    # The last save's tensor is out of the model (kept alive elsewhere, e.g. by an optimizer) and holds a
    # dtype no safetensors file can: the selection no longer has it, so the save must not fail on it.
    model = make_peft(tiny_llama(), lora_config())
    fastadapter.save(model, tmp_path / "first")
    attn = model.get_submodule("base_model.model.model.layers.0.self_attn")
    removed = attn.q_proj  # held elsewhere: every tensor the last save wrote is still alive
    attn.q_proj = removed.get_base_layer()
    held = removed.lora_A["default"].weight
    held.data = torch.zeros(held.shape, dtype=torch.complex128)
    fastadapter.save(model, tmp_path / "ours")
    assert taken == []
    save_with_peft(model, tmp_path / "peft")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")
