"""`fastadapter.patch()` / `unpatch()` / `patched()` / `patch_report()`: what is replaced and put back, the
import hook, the report and the log; fallbacks keep PEFT's own behaviour, errors included."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.integrations.peft import PeftAdapterMixin

import fastadapter
from helpers import lora_config, make_peft, tiny_llama

SITES = [
    (PeftModel, "save_pretrained"),
    (PeftModel, "from_pretrained"),
    (PeftModel, "load_adapter"),
    (PeftAdapterMixin, "load_adapter"),
    (PreTrainedModel, "save_pretrained"),
]


def test_unpatch_puts_back_the_very_objects_patch_replaced() -> None:
    import peft.utils.hotswap as hotswap

    before = [vars(owner)[name] for owner, name in SITES] + [vars(hotswap)["hotswap_adapter"]]
    fastadapter.patch()
    fastadapter.patch()  # idempotent: nothing is wrapped twice
    during = [vars(owner)[name] for owner, name in SITES] + [vars(hotswap)["hotswap_adapter"]]
    assert all(a is not b for a, b in zip(before, during, strict=True))
    fastadapter.patch()
    assert [vars(owner)[name] for owner, name in SITES] + [vars(hotswap)["hotswap_adapter"]] == during
    fastadapter.unpatch()
    after = [vars(owner)[name] for owner, name in SITES] + [vars(hotswap)["hotswap_adapter"]]
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_patched_context_restores_only_what_it_patched() -> None:
    original = vars(PeftModel)["save_pretrained"]
    with fastadapter.patched():
        assert vars(PeftModel)["save_pretrained"] is not original
    assert vars(PeftModel)["save_pretrained"] is original
    fastadapter.patch()
    with fastadapter.patched():
        pass
    assert vars(PeftModel)["save_pretrained"] is not original  # patched before the block: still patched


def test_signatures_are_the_originals() -> None:
    import inspect

    before = [inspect.signature(getattr(owner, name)) for owner, name in SITES]
    with fastadapter.patched():
        assert [inspect.signature(getattr(owner, name)) for owner, name in SITES] == before


SCRIPT = """
import sys
import fastadapter
assert not {"torch", "peft", "transformers"} & set(sys.modules), "import fastadapter imported a framework"
fastadapter.patch()
assert "peft" not in sys.modules
from peft import PeftModel
from transformers import PreTrainedModel
from fastadapter.integrations._patch_sites import originals
found = originals()
assert sorted(found) == sorted([
    "PeftModel.save_pretrained", "PeftModel.from_pretrained", "PeftModel.load_adapter",
    "PeftAdapterMixin.load_adapter", "PreTrainedModel.save_pretrained",
]), sorted(found)
import peft.utils.hotswap
assert "hotswap_adapter" in originals()
patched = vars(PeftModel)["save_pretrained"]
assert patched is not found["PeftModel.save_pretrained"]
fastadapter.unpatch()
assert vars(PeftModel)["save_pretrained"] is found["PeftModel.save_pretrained"]
assert vars(PeftModel)["from_pretrained"].__func__ is found["PeftModel.from_pretrained"]
assert vars(PreTrainedModel)["save_pretrained"] is found["PreTrainedModel.save_pretrained"]
assert not any(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path)
print("ok")
"""


def test_patch_before_peft_and_transformers_are_imported_patches_them_on_import() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_each_call_is_logged_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = make_peft(tiny_llama(), lora_config())
    (tmp_path / "file").write_text("")
    caplog.set_level(logging.DEBUG, logger="fastadapter")
    with fastadapter.patched():
        model.save_pretrained(str(tmp_path / "a"))
        with pytest.raises(ValueError, match="should be a directory, not a file"):
            model.save_pretrained(str(tmp_path / "file"))
    messages = [r.getMessage() for r in caplog.records if r.name == "fastadapter"]
    assert messages == [
        "PeftModel.save_pretrained: routed to fastadapter",
        "PeftModel.save_pretrained: fell back to the original (save_directory is a file (PEFT's own error))",
    ]
    report = fastadapter.patch_report(reset=True)
    assert report.routed["PeftModel.save_pretrained"] == 1
    assert report.fallbacks[("PeftModel.save_pretrained", "save_directory is a file (PEFT's own error)")] == 1
    assert "1 calls routed, 1 fell back" in str(report)
    assert fastadapter.patch_report().total_routed == 0


def test_verbose_prints_the_decisions(tmp_path: Path) -> None:
    script = f"""
import fastadapter, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
fastadapter.patch(verbose=True)
from helpers import make_peft, tiny_llama, lora_config
make_peft(tiny_llama(), lora_config()).save_pretrained({str(tmp_path / "v")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fastadapter: PeftModel.save_pretrained: routed to fastadapter" in done.stderr


def test_load_into_an_existing_adapter_name_runs_peft_and_keeps_peft_semantics(tmp_path: Path) -> None:
    make_peft(tiny_llama(), lora_config(), seed=1).save_pretrained(str(tmp_path / "a"))
    make_peft(tiny_llama(), lora_config(), seed=2).save_pretrained(str(tmp_path / "b"))
    expected = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    expected_result = expected.load_adapter(str(tmp_path / "b"), "default")
    with fastadapter.patched():
        model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        result = model.load_adapter(str(tmp_path / "b"), "default")
    assert result == expected_result
    for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    report = fastadapter.patch_report()
    assert report.routed["PeftModel.from_pretrained"] == 1
    assert report.fallbacks_of("PeftModel.load_adapter") == 1


def test_unsupported_configs_fall_back_with_a_reason(tmp_path: Path) -> None:
    base = make_peft(tiny_llama(), lora_config(init_lora_weights="pissa"), seed=1)
    base.save_pretrained(str(tmp_path / "pissa"))
    expected = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pissa"))
    with fastadapter.patched():
        got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "pissa"))
    for (name, a), (_, b) in zip(got.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    (reason,) = [r for (c, r) in fastadapter.patch_report().fallbacks if c == "PeftModel.from_pretrained"]
    assert "init_lora_weights" in reason
