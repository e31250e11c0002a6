"""File names, key prefixes and shorthands of PEFT's and transformers' formats, defined once."""

from __future__ import annotations

# An adapter directory (PEFT's `save_pretrained`, transformers' adapter-only `save_pretrained`).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # `safe_serialization=False`
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"
GENERATION_CONFIG = "generation_config.json"  # transformers writes it beside a generative model's adapter

# A full checkpoint: safetensors shards and their index; torch `.bin` shards and theirs.
MODEL_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# Every key of an adapter file starts with the PeftModel's path to the base model.
PEFT_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"
# `target_modules="all-linear"`: every Linear / Conv1D but the output layer.
ALL_LINEAR = "all-linear"
