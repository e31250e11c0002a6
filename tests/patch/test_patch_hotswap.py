"""`peft.utils.hotswap.hotswap_adapter` patched: routed to fastadapter's hotswap with PEFT's own result
(weights in place, scaling, the config and lora_alpha left as they were), or PEFT's own function where
it would do otherwise, its errors included. PEFT, unpatched, is the oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import fastadapter
from helpers import assert_same_state, logits, lora_config, make_peft, model_state, tiny_llama, token_ids

CALL = "hotswap_adapter"


def saved(tmp_path: Path, name: str, seed: int, safe: bool = True, **cfg: Any) -> str:
    directory = tmp_path / name
    make_peft(tiny_llama(seed=0), lora_config(**cfg), seed=seed).save_pretrained(
        str(directory), safe_serialization=safe
    )
    return str(directory)


def lora_pointers(model: PeftModel) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}


def swap_both_ways(
    build: Callable[[], PeftModel], directory: str, adapter_name: str = "default", **kwargs: Any
) -> tuple[PeftModel, PeftModel, BaseException | None, BaseException | None, dict[str, int]]:
    """The same swap unpatched, then patched, each on its own model: (patched model, PEFT's model,
    patched error, PEFT's error, the patched model's LoRA data pointers before the swap)."""

    def swap(model: PeftModel) -> BaseException | None:
        import peft.utils.hotswap as module  # the patched function is looked up at call time

        try:
            module.hotswap_adapter(model, directory, adapter_name, **kwargs)
        except Exception as e:  # PEFT's errors are part of what must be equal
            return e
        return None

    fastadapter.unpatch()
    expected = build()
    expected_error = swap(expected)
    fastadapter.patch()
    got = build()
    before = lora_pointers(got)
    got_error = swap(got)
    fastadapter.unpatch()
    return got, expected, got_error, expected_error, before


def assert_same(got: PeftModel, expected: PeftModel) -> None:
    assert_same_state(model_state(got), model_state(expected))
    for name in expected.peft_config:
        got.set_adapter(name)
        expected.set_adapter(name)
        assert torch.equal(logits(got, token_ids()), logits(expected, token_ids())), name


@pytest.mark.parametrize(
    "case",
    ["same-config", "smaller-rank", "subset-of-targets", "bin-file", "other-alpha", "not-active"],
)
def test_routed_hotswap_gives_peft_result_in_place(tmp_path: Path, case: str) -> None:
    first = saved(tmp_path, "first", seed=1, r=8, lora_alpha=16)
    swap_in = {
        "same-config": lambda: saved(tmp_path, "b", seed=2, r=8, lora_alpha=16),
        "smaller-rank": lambda: saved(tmp_path, "b", seed=2, r=4, lora_alpha=16),
        "subset-of-targets": lambda: saved(
            tmp_path, "b", seed=2, r=8, lora_alpha=16, target_modules=["q_proj"]
        ),
        "bin-file": lambda: saved(tmp_path, "b", seed=2, safe=False, r=8, lora_alpha=16),
        # PEFT does not update the config: lora_alpha keeps the first adapter's, the scaling changes.
        "other-alpha": lambda: saved(tmp_path, "b", seed=2, r=8, lora_alpha=4),
        "not-active": lambda: saved(tmp_path, "b", seed=2, r=8, lora_alpha=16),
    }[case]()
    name = "other" if case == "not-active" else "default"

    def build() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), first)
        if case == "not-active":
            model.load_adapter(first, "other")
        return model

    got, expected, got_error, expected_error, before = swap_both_ways(build, swap_in, name)
    assert expected_error is None
    assert got_error is None
    assert_same(got, expected)
    assert lora_pointers(got) == before  # every LoRA weight swapped in place
    assert got.peft_config[name].lora_alpha == 16  # PEFT keeps the held adapter's config
    assert fastadapter.patch_report().routed[CALL] == 1, str(fastadapter.patch_report())


def test_routed_hotswap_on_a_model_prepared_for_compiled_hotswap(tmp_path: Path) -> None:
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    first = saved(tmp_path, "first", seed=1, r=4, lora_alpha=8)
    second = saved(tmp_path, "second", seed=2, r=2, lora_alpha=8)

    def build() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), first)
        prepare_model_for_compiled_hotswap(model, target_rank=8)  # scalings become tensors, ranks padded
        return model

    got, expected, got_error, expected_error, before = swap_both_ways(build, second)
    assert expected_error is None
    assert got_error is None
    assert_same(got, expected)
    scalings = [m.scaling["default"] for m in got.modules() if isinstance(m, LoraLayer)]
    assert scalings
    assert all(isinstance(s, torch.Tensor) and float(s) == 4.0 for s in scalings)  # alpha 8 / rank 2
    assert lora_pointers(got) == before
    assert fastadapter.patch_report().routed[CALL] == 1


@pytest.mark.parametrize(
    ("case", "reason_part"),
    [
        ("alpha-pattern", "incompatible configs"),  # PEFT raises ValueError
        ("higher-rank", "TensorError: tensor"),  # PEFT replaces the tensors (not in place)
        ("merged", "merged"),  # PEFT raises ValueError
        ("unknown-name", "unknown adapter name"),  # PEFT raises RuntimeError
        ("new-target", "has no such weight"),  # PEFT raises RuntimeError
        ("name-in-other-name", "part of other state-dict keys"),  # PEFT zeroes "default2" too
    ],
)
def test_what_peft_does_otherwise_runs_peft_own(tmp_path: Path, case: str, reason_part: str) -> None:
    first = saved(tmp_path, "first", seed=1, r=4, lora_alpha=8)
    swap_in = {
        "alpha-pattern": lambda: saved(tmp_path, "b", seed=2, r=4, lora_alpha=8, alpha_pattern={"q_proj": 2}),
        "higher-rank": lambda: saved(tmp_path, "b", seed=2, r=8, lora_alpha=8),
        "new-target": lambda: saved(tmp_path, "b", seed=2, r=4, lora_alpha=8, target_modules=["k_proj"]),
    }.get(case, lambda: saved(tmp_path, "b", seed=2, r=4, lora_alpha=8))()

    def build() -> PeftModel:
        model = PeftModel.from_pretrained(tiny_llama(seed=0), first)
        if case == "merged":
            model.merge_adapter()
        if case == "name-in-other-name":
            model.load_adapter(first, "default2")
        return model

    name = "missing" if case == "unknown-name" else "default"
    got, expected, got_error, expected_error, _ = swap_both_ways(build, swap_in, name)
    assert type(got_error) is type(expected_error)
    assert str(got_error) == str(expected_error)
    if case == "merged":
        got.unmerge_adapter()
        expected.unmerge_adapter()
    assert_same(got, expected)
    report = fastadapter.patch_report()
    assert report.routed[CALL] == 0
    (reason,) = [r for (c, r) in report.fallbacks if c == CALL]
    assert reason_part in reason, reason
