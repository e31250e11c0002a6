"""The model card: PEFT's own, and still PEFT's when fastadapter reuses a rendered card between saves."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import get_peft_model

import fastadapter
from helpers import lora_config, tiny_llama


def _card(directory: Path) -> str:
    return (directory / "README.md").read_text()


def test_repeated_saves_keep_peft_card(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), lora_config())
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for _ in range(3):
        model.save_pretrained(theirs)
        fastadapter.save(model, ours)
        assert _card(ours) == _card(theirs)


def test_hand_edited_card_is_updated_like_peft(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), lora_config())
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    fastadapter.save(model, ours)  # the card is now cached for this model
    edited = _card(ours).replace("# Model Card for Model ID", "# My adapter\n\nTrained on my data.")
    (ours / "README.md").write_text(edited)
    shutil.copytree(ours, theirs)
    model.save_pretrained(theirs)
    fastadapter.save(model, ours)
    assert "Trained on my data." in _card(ours)
    assert _card(ours) == _card(theirs)


def test_card_follows_changed_model_tags(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), lora_config())
    fastadapter.save(model, tmp_path / "first")
    model.get_base_model().model_tags = ["my-tag"]
    model.save_pretrained(tmp_path / "theirs")
    fastadapter.save(model, tmp_path / "ours")
    assert "my-tag" in _card(tmp_path / "ours")
    assert _card(tmp_path / "ours") == _card(tmp_path / "theirs")
