"""The Trainer callback: a few real training steps on a tiny generated model; the checkpoints it makes
load in PEFT and resume the Trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import Trainer

from fastadapter.integrations.transformers import FastAdapterCallback
from helpers import (
    LLAMA_LINEARS,
    Tokens,
    lora_config,
    lora_params,
    make_peft,
    tiny_llama,
    training_args,
)


def trainer(output: Path, model: Any, max_steps: int, **kwargs: Any) -> Trainer:
    args = training_args(output, max_steps, **kwargs)
    return Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        eval_dataset=Tokens(4),
        callbacks=[FastAdapterCallback()],
    )


def test_trainer_checkpoints_load_in_peft_and_resume(tmp_path: Path) -> None:
    model = make_peft(tiny_llama(), lora_config(target_modules=LLAMA_LINEARS)).train()
    t = trainer(tmp_path, model, max_steps=4, save_total_limit=1)
    t.train()
    # save_total_limit=1 became keep_last=1; the Trainer wrote nothing itself (no optimizer.pt).
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == ["checkpoint-4"]
    ckpt = tmp_path / "checkpoint-4"
    assert not (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4

    trained = lora_params(model)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(ckpt))
    for key, value in lora_params(reloaded).items():
        assert torch.equal(value, trained[key]), key

    # Resume: a fresh model (other adapter init) continues from step 4 with the saved weights.
    fresh = make_peft(tiny_llama(), lora_config(target_modules=LLAMA_LINEARS), seed=7).train()
    resumed = trainer(tmp_path, fresh, max_steps=6)
    loaded: dict[str, torch.Tensor] = {}
    resumed.add_callback(_Capture(loaded))
    resumed.train(resume_from_checkpoint=True)  # finds checkpoint-4 (get_last_checkpoint)
    assert resumed.state.global_step == 6
    for key, value in loaded.items():
        assert torch.equal(value, trained[key]), key
    assert loaded  # the capture saw the adapter
    assert (tmp_path / "checkpoint-6" / "adapter_model.safetensors").is_file()


class _Capture(FastAdapterCallback.__mro__[1]):  # a plain TrainerCallback
    """Records the adapter weights at the start of training (after the Trainer loaded the checkpoint)."""

    def __init__(self, into: dict[str, torch.Tensor]) -> None:
        self.into = into

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.into.update(lora_params(model))


def test_load_best_model_at_end_is_refused(tmp_path: Path) -> None:
    model = make_peft(tiny_llama(), lora_config(target_modules=LLAMA_LINEARS))
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        trainer(
            tmp_path, model, max_steps=2, load_best_model_at_end=True, eval_strategy="steps", eval_steps=2
        )
