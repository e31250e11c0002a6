"""transformers' Trainer with only `fastadapter.patch()` added: its adapter checkpoints are the files the
unpatched run writes, and `resume_from_checkpoint` continues from them exactly as it does unpatched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

import fastadapter
from helpers import (
    LLAMA_LINEARS,
    Tokens,
    lora_config,
    lora_params,
    make_peft,
    tiny_llama,
    training_args,
)

# What a Trainer checkpoint of a PeftModel holds besides the adapter: the Trainer's own state files.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")


def train(output: Path, max_steps: int, resume: Path | None = None, **kwargs: Any) -> Any:
    model = make_peft(
        tiny_llama(), lora_config(target_modules=LLAMA_LINEARS), seed=5 if resume else 1
    ).train()
    args = training_args(output, max_steps, **kwargs)
    Trainer(model=model, args=args, train_dataset=Tokens()).train(
        resume_from_checkpoint=str(resume) if resume else None
    )
    return model


def adapter_files(checkpoint: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ADAPTER_FILES:
        data = (checkpoint / name).read_bytes()
        if name.endswith(".json"):
            config = json.loads(data)
            config["target_modules"] = sorted(config["target_modules"])  # a set: PEFT writes it in hash order
            out[name] = config
        else:
            out[name] = data
    return out


def test_checkpoints_equal_the_unpatched_runs_and_resume(tmp_path: Path) -> None:
    plain = train(tmp_path / "plain", 4)
    with fastadapter.patched():
        patched = train(tmp_path / "patched", 4)
    report = fastadapter.patch_report()
    assert report.routed["PeftModel.save_pretrained"] == 2  # checkpoint-2 and checkpoint-4
    for step in (2, 4):
        ours, theirs = tmp_path / "patched" / f"checkpoint-{step}", tmp_path / "plain" / f"checkpoint-{step}"
        assert adapter_files(ours) == adapter_files(theirs)
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert all(torch.equal(v, lora_params(plain)[k]) for k, v in lora_params(patched).items())

    # Resume from the patched run's checkpoint-2, patched, and from the plain run's, unpatched: same end.
    resumed_plain = train(tmp_path / "plain", 6, resume=tmp_path / "plain" / "checkpoint-2")
    with fastadapter.patched():
        resumed = train(tmp_path / "patched", 6, resume=tmp_path / "patched" / "checkpoint-2")
    expected = lora_params(resumed_plain)
    got = lora_params(resumed)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert adapter_files(tmp_path / "patched" / "checkpoint-6") == adapter_files(
        tmp_path / "plain" / "checkpoint-6"
    )
