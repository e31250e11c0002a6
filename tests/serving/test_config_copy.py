"""`own_copy`: each hotswap installs a copy of a config built once per content of adapter_config.json;
the copy must share nothing mutable with the one kept (fastadapter's AdapterConfig and PEFT's)."""

from __future__ import annotations

from typing import Any

import pytest
from peft import LoraConfig

from fastadapter._config import AdapterConfig, own_copy

VALUES: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "target_modules": {"q_proj", "v_proj"},
    "rank_pattern": {"q_proj": 4},
    "alpha_pattern": {},
    "layers_to_transform": [0, 1],
}


def _containers(config: Any) -> dict[str, Any]:
    fields = config.__dict__["_values"] if isinstance(config, AdapterConfig) else vars(config)
    return {k: v for k, v in fields.items() if isinstance(v, (dict, list, set))}


@pytest.mark.parametrize("kind", ["fastadapter", "peft"])
def test_a_copy_equals_the_config_and_shares_no_container(kind: str) -> None:
    config = AdapterConfig(dict(VALUES)) if kind == "fastadapter" else LoraConfig(**VALUES)
    copied = own_copy(config)
    assert type(copied) is type(config)
    assert copied.to_dict() == config.to_dict()
    containers = _containers(config)
    assert {"target_modules", "rank_pattern", "layers_to_transform"} <= set(containers)
    for key, value in _containers(copied).items():
        assert value is not containers[key], key
    copied.rank_pattern["k_proj"] = 2
    copied.target_modules.add("o_proj")
    assert config.rank_pattern == {"q_proj": 4}
    assert config.target_modules == {"q_proj", "v_proj"}
