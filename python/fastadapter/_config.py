"""`adapter_config.json` read and checked without peft: what fastadapter implements, and nothing else.

The field list and defaults are peft 0.21's `LoraConfig` (and its `PeftConfig` base). A field fastadapter does
not implement is accepted only at its default value; anything else is refused with an error naming the field,
never ignored. Unknown fields (from a newer peft) are accepted only when they are empty (None, False, {}, []).
"""

from __future__ import annotations

import copy
import enum
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedAdapterError
from .names import ADAPTER_CONFIG, ALL_LINEAR, MODEL_CARD

# peft 0.21.2 `LoraConfig().to_dict()` (target_modules aside), the values every saved config starts from.
DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Defaults a parsed config may change in place (containers): each config gets its own copy.
_MUTABLE_DEFAULTS = frozenset(k for k, v in DEFAULTS.items() if isinstance(v, (dict, list, set)))

# LoRA options and variants fastadapter does not implement: only their default value is accepted.
UNSUPPORTED = (
    "alora_invocation_tokens",
    "arrow_config",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "kasa_config",
    "layer_replication",
    "loftq_config",
    "lora_ga_config",
    "megatron_config",
    "monteclora_config",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_qalora",
    "velora_config",
)

# peft's TaskType values.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INIT_LORA_WEIGHTS = (True, False, "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


class AdapterConfig:
    """A LoRA adapter config: PEFT's `LoraConfig` fields as attributes (so the save code reads it like a
    LoraConfig), `to_dict()` as PEFT writes it. Sets (`target_modules`, `exclude_modules` given as lists)
    are kept as Python sets, as in PEFT."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__["_values"] = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__["_values"][name] = value

    def __copy__(self) -> AdapterConfig:
        return AdapterConfig(_own_values(self.__dict__["_values"]))

    def __repr__(self) -> str:
        return f"AdapterConfig({self.__dict__['_values']!r})"

    # Attributes PEFT configs have that the save code asks for.
    is_prompt_learning = False

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__["_values"])


_IMMUTABLE = (str, int, float, bool, type(None), enum.Enum, frozenset, tuple, bytes)


def _own_values(values: dict[str, Any]) -> dict[str, Any]:
    """What `copy.deepcopy(values)` gives, deep-copying only the mutable values (a config holds a few
    containers among ~60 scalars; a hotswap copies a config on every swap)."""
    return {k: v if isinstance(v, _IMMUTABLE) else copy.deepcopy(v) for k, v in values.items()}


def own_copy(config: Any) -> Any:
    """A copy of `config` (fastadapter's AdapterConfig or a PEFT config) sharing nothing mutable with it."""
    out = copy.copy(config)
    if not isinstance(config, AdapterConfig):  # AdapterConfig's __copy__ already owns its values
        vars(out).update(_own_values(vars(out)))
    return out


STATE_ATTR = "_fastadapter"  # where a model injected by fastadapter keeps its AdapterState


@dataclass
class AdapterState:
    """What fastadapter keeps on a model it injected: each adapter's config, and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def adapter_state(model: Any) -> AdapterState | None:
    state = getattr(model, "__dict__", {}).get(STATE_ATTR)
    return state if isinstance(state, AdapterState) else None


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple)) and not value)


def _fail(field: str, value: Any, expected: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: field `{field}` is {value!r}, expected {expected}")


def _str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_config(raw: Mapping[str, Any], where: str = "adapter config") -> AdapterConfig:
    """Check `raw` (the JSON object of adapter_config.json, a dict, or a peft LoraConfig's `to_dict()`) and
    return it completed with PEFT's defaults. `where` names the source in error messages."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    raw.pop("runtime_config", None)  # never saved by PEFT; runtime-only options
    peft_type = raw.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # a peft PeftType enum
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type {peft_type!r} is not supported; fastadapter loads LoRA adapters only"
        )
    values = {k: copy.deepcopy(v) if k in _MUTABLE_DEFAULTS else v for k, v in DEFAULTS.items()}
    for key, value in raw.items():
        if key not in DEFAULTS and not _is_empty(value):
            raise UnsupportedAdapterError(
                f"{where}: option `{key}` = {value!r} is unknown to fastadapter (from a newer "
                "peft?); refusing to ignore it"
            )
        values[key] = getattr(value, "value", value) if key in ("task_type", "peft_type") else value
    values["peft_type"] = "LORA"

    for key in UNSUPPORTED:
        if values[key] != DEFAULTS[key] and not (_is_empty(values[key]) and _is_empty(DEFAULTS[key])):
            raise UnsupportedAdapterError(
                f"{where}: option `{key}` = {values[key]!r} is not supported by fastadapter "
                f"(only its default, {DEFAULTS[key]!r})"
            )
    _check_types(values, where)
    return AdapterConfig(values)


def _check_types(v: dict[str, Any], where: str) -> None:
    if not isinstance(v["r"], int) or isinstance(v["r"], bool) or v["r"] <= 0:
        raise _fail("r", v["r"], "a positive integer", where)
    if not _number(v["lora_alpha"]):
        raise _fail("lora_alpha", v["lora_alpha"], "a number", where)
    if not _number(v["lora_dropout"]) or not 0.0 <= v["lora_dropout"] <= 1.0:
        raise _fail("lora_dropout", v["lora_dropout"], "a probability between 0 and 1", where)
    for key in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        if not isinstance(v[key], bool):
            raise _fail(key, v[key], "true or false", where)
    if v["bias"] not in BIAS_MODES:
        raise UnsupportedAdapterError(f"{where}: option `bias` = {v['bias']!r} is not one of {BIAS_MODES}")
    if v["init_lora_weights"] not in INIT_LORA_WEIGHTS or (
        # 1 == True and 0 == False in Python: only real booleans and "gaussian".
        not isinstance(v["init_lora_weights"], (bool, str))
    ):
        raise UnsupportedAdapterError(
            f"{where}: option `init_lora_weights` = {v['init_lora_weights']!r} is not supported "
            "by fastadapter (true, false or 'gaussian')"
        )
    if v["task_type"] is not None and v["task_type"] not in TASK_TYPES:
        raise _fail("task_type", v["task_type"], f"null or one of {TASK_TYPES}", where)

    target = v["target_modules"]
    if target is None:
        raise ConfigError(
            f"{where}: field `target_modules` is not set; fastadapter does not guess targets from the "
            "architecture, name them"
        )
    if isinstance(target, str):
        _check_regex("target_modules", target, where, allow_all_linear=True)
    elif _str_list(target):
        v["target_modules"] = set(target)
    else:
        raise _fail("target_modules", target, "a list of module names or a regex string", where)
    exclude = v["exclude_modules"]
    if isinstance(exclude, str):
        _check_regex("exclude_modules", exclude, where)
    elif _str_list(exclude):
        v["exclude_modules"] = set(exclude)
    elif exclude is not None:
        raise _fail("exclude_modules", exclude, "null, a list of module names or a regex string", where)

    layers = v["layers_to_transform"]
    if (
        layers is not None
        and not (isinstance(layers, int) and not isinstance(layers, bool))
        and not _int_list(layers)
    ):
        raise _fail("layers_to_transform", layers, "null, an integer or a list of integers", where)
    pattern = v["layers_pattern"]
    if pattern is not None and not isinstance(pattern, str) and not _str_list(pattern):
        raise _fail("layers_pattern", pattern, "null, a string or a list of strings", where)
    # PEFT's own consistency rules (LoraConfig.__post_init__).
    if isinstance(target, str) and layers is not None:
        raise ConfigError(f"{where}: `layers_to_transform` cannot be used when `target_modules` is a str")
    if isinstance(target, str) and pattern is not None:
        raise ConfigError(f"{where}: `layers_pattern` cannot be used when `target_modules` is a str")
    if pattern and layers is None:
        raise ConfigError(f"{where}: when `layers_pattern` is specified, `layers_to_transform` must be too")

    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("rank_pattern", _positive_int, "positive integers"),
        ("alpha_pattern", _number, "numbers"),
    )
    for key, check, expected in checks:
        pat = v[key]
        if pat is None:
            v[key] = {}
        elif not isinstance(pat, dict) or not all(isinstance(k, str) and check(x) for k, x in pat.items()):
            raise _fail(key, pat, f"an object mapping module-name patterns to {expected}", where)
        for k in v[key]:
            _check_regex(f"{key}[{k!r}]", k, where)
    mts = v["modules_to_save"]
    if mts is not None:
        if not _str_list(mts):
            raise _fail("modules_to_save", mts, "null or a list of module names", where)
        v["modules_to_save"] = list(mts)
    if v["lora_bias"] and v["use_dora"]:
        raise ConfigError(
            f"{where}: `lora_bias` = true is not supported together with `use_dora` (as in PEFT)"
        )


def _check_regex(field: str, pattern: str, where: str, allow_all_linear: bool = False) -> None:
    import re

    if allow_all_linear and pattern.lower() == ALL_LINEAR:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"{where}: field `{field}` = {pattern!r} is not a valid regular expression: {e}"
        ) from None


def read_config(adapter_dir: str) -> AdapterConfig:
    """Read and check `adapter_dir/adapter_config.json`."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(2, "adapter directory not found", adapter_dir)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"no {ADAPTER_CONFIG} in the adapter directory", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return parse_config(raw, where=path)


def config_from_object(config: Any) -> AdapterConfig:
    """An AdapterConfig from what a user passes to `inject`: a mapping, a peft LoraConfig (anything with
    `to_dict()`), or an AdapterConfig (copied)."""
    if isinstance(config, AdapterConfig):
        return copy.copy(config)
    if isinstance(config, Mapping):
        return parse_config(config, where="config")
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        values = to_dict()
        # peft's target_modules/exclude_modules are sets; parse_config expects JSON-like lists.
        for key in ("target_modules", "exclude_modules"):
            if isinstance(values.get(key), (set, frozenset)):
                values[key] = sorted(values[key])
        return parse_config(values, where=f"{type(config).__name__}")
    raise ConfigError(f"config: expected a mapping or a peft LoraConfig, got {type(config).__name__}")


# --- writing, for models fastadapter injected (PeftModel saves go through _peft_files) -------------------


def base_model_name_or_path(model: Any, config: Any) -> str | None:
    """What PEFT fills into an unset `base_model_name_or_path`: the model's `name_or_path`."""
    if config.base_model_name_or_path is not None:
        return str(config.base_model_name_or_path)
    name = model.__dict__.get("name_or_path", None)
    return name or None


def _peft_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def config_json(model: Any, config: AdapterConfig, *, converted_from_initial: bool = False) -> bytes:
    """`adapter_config.json` as PEFT writes it for the same config (sets sorted, as fastadapter does)."""
    out = config.to_dict()
    out["inference_mode"] = True
    if out.get("peft_version") is None:
        out["peft_version"] = _peft_version()
    if converted_from_initial:
        out["init_lora_weights"] = True
        out["r"] *= 2
        out["lora_alpha"] *= 2 if not out["use_rslora"] else 2**0.5
        for key in ("rank_pattern", "alpha_pattern"):
            if out[key]:
                out[key] = {k: 2 * v for k, v in out[key].items()}
    for key, value in out.items():
        if isinstance(value, (set, frozenset)):
            out[key] = sorted(value)
    if out["task_type"] is None:
        cls = type(model)
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return json.dumps(out, indent=2, sort_keys=True).encode()


def model_card(model: Any, save_directory: str) -> bytes:
    """A small model card of fastadapter's own (PEFT renders its card from the PeftModel); an existing
    README.md is kept as it is."""
    existing = os.path.join(save_directory, MODEL_CARD)
    if os.path.isfile(existing):
        with open(existing, "rb") as f:
            return f.read()
    base = model.__dict__.get("name_or_path", None) or None
    front = ["---", "library_name: peft", "tags:", "- lora", "- fastadapter"]
    if base:
        front.insert(1, f"base_model: {base}")
    lines = [*front, "---", "", f"# LoRA adapter for {base or type(model).__name__}", ""]
    lines.append("Saved by fastadapter; loads with `peft.PeftModel.from_pretrained` or `fastadapter.load`.")
    return ("\n".join(lines) + "\n").encode()
