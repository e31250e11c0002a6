"""`adapter_config.json` and `README.md` for a PeftModel, as `PeftModel.save_pretrained` writes them."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import weakref
from collections.abc import Hashable
from typing import Any


def base_model_name_or_path(model: Any, config: Any) -> str | None:
    """The value PEFT fills into an unset `base_model_name_or_path` (and keeps on the config)."""
    if config.base_model_name_or_path is not None:
        return str(config.base_model_name_or_path)
    inner = model.base_model if config.is_prompt_learning else model.base_model.model
    name = inner.__dict__.get("name_or_path", None)
    return name or None


def config_json(model: Any, config: Any, *, converted_from_initial: bool = False) -> bytes:
    """The bytes of `adapter_config.json`: PEFT's `json.dumps(to_dict(), indent=2, sort_keys=True)`,
    except that sets are written sorted so the file is the same in every process (PEFT writes a set in
    hash order, which changes with PYTHONHASHSEED)."""
    cfg = copy.copy(config)
    cfg.inference_mode = True
    if converted_from_initial:
        # The config of a PiSSA/CorDA/OLoRA adapter converted to plain LoRA: twice the rank.
        cfg.init_lora_weights = True
        cfg.r *= 2
        cfg.lora_alpha *= 2 if not cfg.use_rslora else 2**0.5
        if cfg.rank_pattern:
            cfg.rank_pattern = {k: 2 * v for k, v in cfg.rank_pattern.items()}
        if cfg.alpha_pattern:
            cfg.alpha_pattern = {k: 2 * v for k, v in cfg.alpha_pattern.items()}
    out: dict[str, Any] = cfg.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = _sorted(value)
    if config.task_type is None:
        base_cls = (model.base_model if config.is_prompt_learning else model.base_model.model).__class__
        out["auto_mapping"] = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    return json.dumps(out, indent=2, sort_keys=True).encode()


def _sorted(values: set[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: a stable order is still better than hash order
        return sorted(values, key=repr)


# Rendered cards per model, keyed by everything PEFT's card reads: rendering the template costs ~1-15 ms,
# a quarter of a 160 MB save, and a training loop saves the same model into the same card again and again.
_CARDS: weakref.WeakKeyDictionary[Any, tuple[Hashable, bytes]] = weakref.WeakKeyDictionary()


def _card_inputs(model: Any, existing: bytes | None) -> Hashable:
    """What `PeftModel.create_or_update_model_card` depends on (peft 0.21), as a hashable key."""
    import peft

    base = model.get_base_model()
    config = getattr(base, "config", None)
    quantization = getattr(config, "quantization_config", None)
    to_dict = getattr(quantization, "to_dict", None)
    return (
        existing,
        peft.__version__,
        type(model),
        str(model.active_peft_config.peft_type),
        getattr(model.base_model, "name_or_path", None),
        tuple(getattr(base, "model_tags", None) or ()),
        type(getattr(model.base_model, "model", None)),
        getattr(config, "_name_or_path", None),
        repr(to_dict() if callable(to_dict) else quantization),
    )


def model_card(model: Any, save_directory: str) -> bytes:
    """PEFT's own model card (`create_or_update_model_card`), rendered in a scratch directory so that
    nothing in `save_directory` changes until every file of the save has been staged. An existing
    README.md there is updated, as PEFT does."""
    existing_path = os.path.join(save_directory, "README.md")
    existing: bytes | None = None
    if os.path.isfile(existing_path):
        with open(existing_path, "rb") as f:
            existing = f.read()
    key = _card_inputs(model, existing)
    cached = _CARDS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with tempfile.TemporaryDirectory(prefix="fastadapter-card-") as scratch:
        if existing is not None:
            with open(os.path.join(scratch, "README.md"), "wb") as f:
                f.write(existing)
        model.create_or_update_model_card(scratch)
        with open(os.path.join(scratch, "README.md"), "rb") as f:
            card = f.read()
    _CARDS[model] = (key, card)
    return card
