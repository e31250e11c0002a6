"""PEFT's own calls with and without `fastadapter.patch()`, against calling fastadapter directly.

Per adapter (Llama-shaped and many-tensor, conftest's), three operations, each with three contenders:

- save into a new directory (the previous round's removed untimed): `peft` (`PeftModel.save_pretrained`,
  unpatched), `peft_patched` (the same call, patched), `fastadapter` (`fastadapter.save`);
- `PeftModel.from_pretrained` until every LoRA weight is resident: `peft`, `peft_patched`, and
  `fastadapter`: what the routed call runs once it has decided (PEFT's wrapper around an adapter that
  targets nothing, then fastadapter's load of the file), without the decision;
- `load_adapter` of a second adapter on a PeftModel holding the first (built untimed): `peft`,
  `peft_patched`, and `fastadapter`: `fastadapter.load(model, dir, adapter_name="second")`.

Target: `peft_patched` within 1.1x of `fastadapter` (what the patch layer adds: its decision and PEFT's
semantics). Each round starts from a fresh bf16 base (meta, then `to_empty`), as bench_load.py does.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, PeftModel

import fastadapter
from bench_load import QUICK, fresh_base, lora_weights, peft_with_default, touch
from conftest import Adapter, BackgroundLoad, settle
from fastadapter.integrations.patch import is_patched

OPERATIONS = ("save", "from_pretrained", "load_adapter")
CONTENDERS = ("fastadapter", "peft_patched", "peft")
ROUNDS, WARMUP_ROUNDS = (1, 0) if QUICK else (5, 1)
# The call each operation makes patched, as the report names it.
CALLS = {
    "save": "PeftModel.save_pretrained",
    "from_pretrained": "PeftModel.from_pretrained",
    "load_adapter": "PeftModel.load_adapter",
}


class Round:
    def __init__(self, operation: str, contender: str, adapter: Adapter, out: Path) -> None:
        self.operation, self.contender, self.adapter = operation, contender, adapter
        self.directory = str(adapter.reference_dir)
        self.out = out
        self.count = 0
        self.model: Any = None
        self.target = ""

    def setup(self) -> None:
        self.model = None
        gc.collect()
        if self.operation == "save":
            self.model = self.adapter.model
            if self.target:
                shutil.rmtree(self.target, ignore_errors=True)  # the previous round's, untimed
            self.count += 1
            self.target = str(self.out / f"{self.contender}-{self.count}")  # a new directory each round
            settle()
            return
        os.sync()
        if self.operation == "load_adapter":
            # The first adapter, built the quick way by PEFT itself (patched, it would be routed too).
            patched = is_patched()
            fastadapter.unpatch()
            self.model = peft_with_default(self.adapter.name, self.directory)
            if patched:
                fastadapter.patch()
        else:
            self.model = fresh_base(self.adapter.name)

    def run(self) -> float:
        op, c, d = self.operation, self.contender, self.directory
        if op == "save":
            if c == "fastadapter":
                fastadapter.save(self.model, self.target)
            else:
                self.model.save_pretrained(self.target)
            return 0.0
        if op == "from_pretrained":
            if c == "fastadapter":
                self.model = direct_from_pretrained(self.model, d)
            else:
                self.model = PeftModel.from_pretrained(self.model, d)
            return touch(lora_weights(self.model))
        if c == "fastadapter":
            fastadapter.load(self.model, d, adapter_name="second")
        else:
            self.model.load_adapter(d, "second")
        return touch(lora_weights(self.model, "second"))


def direct_from_pretrained(base: Any, directory: str) -> PeftModel:
    """The routed `from_pretrained`'s work after its decision: fastadapter called directly."""
    from fastadapter._read import read_weights
    from fastadapter.integrations._patch_peft_load import from_pretrained_fast

    config = LoraConfig.from_pretrained(directory)
    model: PeftModel = from_pretrained_fast(
        PeftModel, base, config, read_weights(directory, "default"), "default", False, True
    )
    return model


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_patch(benchmark: Any, adapter: Adapter, out_root: Path, operation: str, contender: str) -> None:
    r = Round(operation, contender, adapter, out_root)
    benchmark.group = f"patch {operation} {adapter.name}"
    benchmark.extra_info.update(
        contender=contender, adapter=adapter.name, bytes=adapter.nbytes, tensors=adapter.tensors
    )
    fastadapter.patch_report(reset=True)
    if contender == "peft_patched":
        fastadapter.patch()
    load = BackgroundLoad()
    load.start()
    try:
        run: Callable[[], float] = r.run
        benchmark.pedantic(run, setup=r.setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    finally:
        fastadapter.unpatch()
    benchmark.extra_info["background_cpu"] = load.stop()
    report = fastadapter.patch_report(reset=True)
    if contender == "peft_patched":
        # Outside the timing: every patched call was routed, none fell back (else the figure is PEFT's).
        assert report.routed[CALLS[operation]] == ROUNDS + WARMUP_ROUNDS, str(report)
        assert report.total_fallbacks == 0, str(report)
    if operation != "save":
        assert (
            len(lora_weights(r.model, "second" if operation == "load_adapter" else "default"))
            == adapter.tensors
        )
    r.model = None
    gc.collect()
