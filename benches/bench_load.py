"""Loading an adapter until every weight is resident: fastadapter vs PEFT and transformers vs reading the
file once.

Each round starts from a fresh bf16 base model (built on the meta device and `to_empty`, so the base costs
neither init time nor touched memory) and ends when every LoRA weight of the loaded adapter has been read
once (`touch`): a lazily mapped file pays its page faults inside the timing, as a first forward would.

- `fastadapter`: `fastadapter.load(base, dir)` on the plain model (fastadapter's own LoRA layers);
- `fastadapter_peft`: `fastadapter.load(peft_model, dir, adapter_name="second")` on a PeftModel that
  already holds the adapter as "default" (built untimed as for `peft_load_adapter`): PEFT's own layers,
  filled by fastadapter; its peer is `peft_load_adapter`;
- `fastadapter_transformers`: `fastadapter.load(model, dir)` on a transformers `PreTrainedModel` with the
  same module tree (conftest's `BenchModel`): PEFT's layers registered through transformers' integration
  when peft is installed; its peer is `transformers_load_adapter`;
- `peft`: `PeftModel.from_pretrained(base, dir)` (random init, then overwrite);
- `peft_low_cpu_mem`: the same with `low_cpu_mem_usage=True` (layers built on the meta device);
- `peft_load_adapter`: `load_adapter(dir, "second")` on a PeftModel that already holds the adapter;
- `transformers_load_adapter`: `model.load_adapter(dir, adapter_name="default")` on the same
  `PreTrainedModel`, as users call it (`low_cpu_mem_usage=False`, the default). It keeps the LoRA
  weights in the base's dtype (bf16 here: half the resident bytes), where PEFT and fastadapter upcast
  them to fp32;
- `floor`: map the file and read every tensor once (`SafetensorsFile` + the same `touch`): no model at all.

The file stays in the page cache (PEFT wrote it just before; every round starts after `os.sync()`, so no
writeback is in flight), so this measures CPU work and page faults, not the disk.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn

import fastadapter
from conftest import QUICK, SAFETENSORS_NAME, Adapter, BackgroundLoad, bench_body, transformers_base
from fastadapter._core import SafetensorsFile
from fastadapter._tensors import mapped_tensors

CONTENDERS = (
    "fastadapter",
    "fastadapter_peft",
    "fastadapter_transformers",
    "peft",
    "peft_low_cpu_mem",
    "peft_load_adapter",
    "transformers_load_adapter",
    "floor",
)
# The contenders that add a second adapter, "second", to a PeftModel holding "default".
SECOND_ADAPTER = ("fastadapter_peft", "peft_load_adapter")
ROUNDS, WARMUP_ROUNDS = (1, 0) if QUICK else (3, 1)


def fresh_base(name: str) -> nn.Module:
    return bench_body(name).to_empty(device="cpu")


def peft_with_default(name: str, directory: str) -> PeftModel:
    """A fresh base with the adapter loaded as "default", the quick way (untimed set-up)."""
    return PeftModel.from_pretrained(fresh_base(name), directory, low_cpu_mem_usage=True)


def adapter_name_of(contender: str) -> str:
    return "second" if contender in SECOND_ADAPTER else "default"


def touch(tensors: Iterable[torch.Tensor]) -> float:
    """Read every byte of every tensor once (sums); returns a value so the work cannot be skipped."""
    total = 0.0
    for t in tensors:
        total += float(t.sum())
    return total


def lora_weights(model: nn.Module, adapter_name: str = "default") -> list[torch.Tensor]:
    """Every LoRA weight of `adapter_name`: the tensors held under a `lora_*` container's `adapter_name`
    entry, in the module trees of PEFT (PeftModel or layers injected through transformers) and fastadapter
    alike. This is the measurement's own overhead, paid by every contender inside its timing, so it walks
    `_modules` directly: `named_parameters()` builds a dotted name for every parameter of the model and
    takes ~20 ms on 1024 LoRA layers, as long as summing their 537 MB. `test_load` checks, untimed, that
    it finds exactly those parameters."""
    out: list[torch.Tensor] = []
    stack = [model]
    while stack:
        module = stack.pop()
        for name, child in module._modules.items():
            if child is None:
                continue
            if not name.startswith("lora_"):
                stack.append(child)
                continue
            entry = child._modules.get(adapter_name)
            if entry is not None:
                out.extend(p for p in entry._parameters.values() if p is not None)
            param = child._parameters.get(adapter_name)  # ParameterDicts (lora_embedding_A/B)
            if param is not None:
                out.append(param)
    return out


def lora_weights_by_name(model: nn.Module, adapter_name: str = "default") -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


class Round:
    """Per-round state: the setup builds what the timed call needs, and drops the previous round's model."""

    def __init__(self, contender: str, adapter: Adapter) -> None:
        self.contender, self.adapter = contender, adapter
        self.directory = str(adapter.reference_dir)
        self.model: Any = None

    def setup(self) -> None:
        self.model = None
        gc.collect()
        # The adapter file was just written: without this, its writeback runs during the first rounds of
        # whichever contender comes first, and faults on a mapping of it wait for the disk.
        os.sync()
        if self.contender in SECOND_ADAPTER:
            # Untimed: the first adapter, built the quick way; the timed call loads the second one.
            self.model = peft_with_default(self.adapter.name, self.directory)
        elif self.contender in ("fastadapter_transformers", "transformers_load_adapter"):
            self.model = transformers_base(self.adapter.name)
        elif self.contender != "floor":
            self.model = fresh_base(self.adapter.name)

    def run(self) -> float:
        c, d = self.contender, self.directory
        if c in ("fastadapter", "fastadapter_transformers"):
            return touch(lora_weights(fastadapter.load(self.model, d)))
        if c == "fastadapter_peft":
            return touch(lora_weights(fastadapter.load(self.model, d, adapter_name="second"), "second"))
        if c == "peft":
            return touch(lora_weights(PeftModel.from_pretrained(self.model, d)))
        if c == "peft_low_cpu_mem":
            return touch(lora_weights(PeftModel.from_pretrained(self.model, d, low_cpu_mem_usage=True)))
        if c == "peft_load_adapter":
            self.model.load_adapter(d, "second")
            return touch(lora_weights(self.model, "second"))
        if c == "transformers_load_adapter":
            self.model.load_adapter(d, adapter_name="default")
            return touch(lora_weights(self.model))
        if c == "floor":
            file = SafetensorsFile(str(Path(d) / SAFETENSORS_NAME))
            return touch(mapped_tensors(file, file.entries()).values())
        raise ValueError(f"unknown contender {c!r}")


@pytest.mark.parametrize("contender", CONTENDERS)
def test_load(benchmark: Any, adapter: Adapter, contender: str) -> None:
    r = Round(contender, adapter)
    benchmark.group = f"load {adapter.name}"
    benchmark.extra_info.update(
        contender=contender, adapter=adapter.name, bytes=adapter.nbytes, tensors=adapter.tensors
    )
    load = BackgroundLoad()
    load.start()
    run: Callable[[], float] = r.run
    benchmark.pedantic(run, setup=r.setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info["background_cpu"] = load.stop()
    if contender != "floor":
        # Outside the timing: the walk finds exactly the adapter's weights, and they are the file's.
        adapter_name = adapter_name_of(contender)
        found = {id(t) for t in lora_weights(r.model, adapter_name)}
        assert found == {id(t) for t in lora_weights_by_name(r.model, adapter_name)}
        assert len(found) == adapter.tensors
        loaded = {n.removeprefix("base_model.model."): p for n, p in r.model.named_parameters()}
        expected = adapter.state_dict
        some = next(iter(expected))
        module_key = some.removeprefix("base_model.model.").replace(
            ".lora_A.weight", f".lora_A.{adapter_name}.weight"
        )
        # transformers' load_adapter keeps LoRA weights in the base's dtype (bf16), where PEFT upcasts;
        # PEFT's low_cpu_mem_usage load goes through layers made in the base's dtype first, so it upcasts
        # bf16-rounded values (PEFT's own result, not the bench's).
        got = loaded[module_key]
        via = torch.bfloat16 if contender == "peft_low_cpu_mem" else got.dtype
        assert torch.equal(got, expected[some].to(via).to(got.dtype))
    r.model = None
    gc.collect()
