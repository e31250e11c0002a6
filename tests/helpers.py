"""Model builders and comparison helpers shared by the save tests.

PEFT is the oracle: every check saves one model with ``PeftModel.save_pretrained`` and with
``fastadapter.save`` and compares what the two wrote. Builders are deterministic (same seed, same weights),
so a test can also build an identical twin of a model, e.g. to reload an adapter onto a fresh base.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

import fastadapter

VOCAB = 96
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
CONFIG = "adapter_config.json"
CARD = "README.md"
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# --- models --------------------------------------------------------------------------------------------


def llama_config(**overrides: Any) -> LlamaConfig:
    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, cls: type[nn.Module] = LlamaForCausalLM, **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    return cls(llama_config(**overrides)).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # bos/eos default to GPT-2's 50256, outside this vocabulary.
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


class TinyMLP(nn.Module):
    """A plain torch module (no transformers config): Linear layers with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.hidden = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def lora_config(**overrides: Any) -> LoraConfig:
    """A LoRA config for the Llama builder: small rank, no dropout (so logits are deterministic)."""
    settings: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    settings.update(overrides)
    return LoraConfig(**settings)


def perturb_trainable(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Simulated training: seeded noise on every trainable parameter, so no adapter weight keeps its
    initial value (LoRA B starts at zero, which would hide a writer that drops or zeroes data)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
                p.add_(noise.to(p.dtype))


def make_peft(
    base: nn.Module,
    config: PeftConfig,
    *,
    seed: int = 1,
    autocast_adapter_dtype: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(
        base, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    perturb_trainable(model, seed)
    return model.eval()


def add_perturbed_adapter(model: PeftModel, name: str, config: PeftConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if f".{name}." in pname or pname.endswith(f".{name}"):
                p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))


def token_ids(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


# --- saving both ways ----------------------------------------------------------------------------------


def save_with_peft(model: PeftModel, directory: Path, **kwargs: Any) -> None:
    model.save_pretrained(str(directory), **kwargs)


def save_with_fastadapter(model: PeftModel, directory: Path, **kwargs: Any) -> None:
    fastadapter.save(model, str(directory), **kwargs)


def tree(root: Path) -> set[str]:
    """Every file and directory under root, as relative paths (directories end in '/')."""
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under root: file bytes, or None for a directory."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def leftovers(root: Path) -> list[str]:
    """Temp files or staging directories a save may have left behind (hidden names, or *.tmp)."""
    return [
        str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
    ]


def safetensors_keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


# LoraConfig fields PEFT holds as sets (written in hash order).
SET_FIELDS = ("target_modules", "exclude_modules")


def assert_same_config(ours: Path, peft: Path) -> dict[str, Any]:
    """adapter_config.json equal as JSON; the set-valued fields (target_modules, exclude_modules) compared
    as sets because PEFT writes a set in hash-seed order while fastadapter writes it sorted."""
    mine, theirs = json.loads(ours.read_text()), json.loads(peft.read_text())
    for key in SET_FIELDS:
        for cfg in (mine, theirs):
            if isinstance(cfg.get(key), list):
                cfg[f"{key}_set"] = set(cfg.pop(key))
        if f"{key}_set" in mine:
            raw = json.loads(ours.read_text())[key]
            assert raw == sorted(raw), f"{key} not sorted in {ours}: {raw}"
    assert mine == theirs
    return theirs


def assert_same_bin(ours: Path, peft: Path) -> dict[str, torch.Tensor]:
    mine = torch.load(ours, weights_only=True)
    theirs = torch.load(peft, weights_only=True)
    assert sorted(mine) == sorted(theirs)
    for key, expected in theirs.items():
        got = mine[key]
        assert type(got) is type(expected), (
            f"{key}: a {type(got).__name__}, PEFT's a {type(expected).__name__}"
        )
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        assert torch.equal(got, expected), key
    return theirs


def assert_card(path: Path, peft_card: Path | None = None) -> None:
    """A model card exists; when PEFT's card is given, it is the same card (fastadapter renders PEFT's)."""
    assert path.is_file(), f"no model card at {path}"
    assert "library_name: peft" in path.read_text()
    if peft_card is not None:
        assert path.read_text() == peft_card.read_text()


def assert_same_files(ours: Path, peft: Path) -> dict[str, list[str]]:
    """Compare two save directories file by file; returns {relative weights path: tensor names} of PEFT's
    files so callers can check the comparison was not vacuous."""
    assert tree(ours) == tree(peft)
    keys: dict[str, list[str]] = {}
    for rel in sorted(tree(peft)):
        mine, theirs = ours / rel, peft / rel
        if theirs.is_dir():
            continue
        if theirs.name == SAFETENSORS:
            assert mine.read_bytes() == theirs.read_bytes(), f"{rel} differs from PEFT's"
            keys[rel] = safetensors_keys(theirs)
        elif theirs.name == BIN:
            keys[rel] = sorted(assert_same_bin(mine, theirs))
        elif theirs.name == CONFIG:
            assert_same_config(mine, theirs)
        elif theirs.name == CARD:
            assert rel == CARD, "the model card belongs at the top level only"
            assert_card(mine, theirs)
        else:
            raise AssertionError(f"PEFT wrote a file the tests do not know: {rel}")
    return keys


def embedding_warnings(save: Callable[..., None], *args: Any, **kwargs: Any) -> list[str]:
    """Run a save and return the messages of its warnings about embedding layers ("Setting
    `save_embedding_layers` to `True` ...", "Could not identify embedding layer(s) ..."): what PEFT says
    about what it decided to write, which fastadapter says too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save(*args, **kwargs)
    return [str(w.message) for w in caught if "embedding layer" in str(w.message)]


def assert_same_as_peft(model: PeftModel, tmp_path: Path, **save_kwargs: Any) -> dict[str, list[str]]:
    """Save with PEFT (first, as a user switching over would have) and with fastadapter, compare every file
    and the embedding-decision warnings.

    PEFT's save fills ``peft_config.base_model_name_or_path``; tests that need fastadapter to do that
    itself save a twin model instead (see ``test_save_parity.py``).
    """
    peft_dir, ours_dir = tmp_path / "peft", tmp_path / "ours"
    expected_warnings = embedding_warnings(save_with_peft, model, peft_dir, **save_kwargs)
    assert embedding_warnings(save_with_fastadapter, model, ours_dir, **save_kwargs) == expected_warnings
    return assert_same_files(ours_dir, peft_dir)


def assert_weights_written(
    keys: dict[str, list[str]],
    expected_files: Iterable[str],
    required_suffixes: Iterable[str] = ("lora_A.weight", "lora_B.weight"),
    prefix: str = "base_model.model.",
) -> None:
    """Not vacuous: each expected weights file exists in PEFT's output and holds the adapter's tensors."""
    assert set(keys) == set(expected_files)
    for rel, names in keys.items():
        assert names, f"{rel} holds no tensors"
        for suffix in required_suffixes:
            assert any(n.endswith(suffix) for n in names), (rel, suffix, names)
        assert all(n.startswith(prefix) for n in names), (rel, names)
        assert not any(".default." in n for n in names), "adapter name must be stripped from keys"


# --- reloading -----------------------------------------------------------------------------------------


@torch.no_grad()
def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def reload(build_base: Callable[[], nn.Module], directory: Path, **kwargs: Any) -> PeftModel:
    return PeftModel.from_pretrained(build_base(), str(directory), **kwargs).eval()


def assert_reloads_like_peft(
    model: PeftModel,
    build_base: Callable[[], nn.Module],
    tmp_path: Path,
    inputs: torch.Tensor,
    *,
    same_as_original: bool = True,
    **load_kwargs: Any,
) -> None:
    """Both saved adapters, loaded onto fresh identical bases, give identical logits; and (when the
    adapter's dtype survives the round trip) the original model's logits."""
    ours = reload(build_base, tmp_path / "ours", **load_kwargs)
    theirs = reload(build_base, tmp_path / "peft", **load_kwargs)
    expected = logits(theirs, inputs)
    assert torch.equal(logits(ours, inputs), expected)
    if same_as_original:
        assert torch.equal(expected, logits(model, inputs))


# --- whole-model state (the patch tests: routed and original calls must leave the same model) ----------


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything a load can change, comparable with ==: the module tree (types, training flags, each LoRA
    layer's active adapters), every parameter and buffer (kind, dtype, device, requires_grad, values), and
    PEFT's bookkeeping (configs, active adapter, targeted modules)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = {
        name: (
            type(m).__name__,
            m.training,
            list(m.active_adapters) if isinstance(m, BaseTunerLayer) else None,
            {k: v for k, v in vars(m).items() if k in ("r", "lora_alpha", "scaling")},
        )
        for name, m in model.named_modules()
    }
    tensors = {
        name: (type(t).__name__, t.dtype, t.device, t.requires_grad, t.detach().cpu().tolist())
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    configs = getattr(model, "peft_config", None) or {}
    books: dict[str, Any] = {name: _config_dict(c) for name, c in configs.items()}
    base = getattr(model, "base_model", None)
    books["__active__"] = getattr(model, "active_adapter", None)
    books["__targeted__"] = list(getattr(base, "targeted_module_names", []) or [])
    books["__hf_loaded__"] = getattr(model, "_hf_peft_config_loaded", None)
    return {"modules": modules, "tensors": tensors, "peft": books}


def _config_dict(config: Any) -> dict[str, Any]:
    d = dict(config.to_dict())
    for key, value in d.items():
        if isinstance(value, (set, frozenset)):
            d[key] = sorted(value)
    return d


def assert_same_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """`model_state` of two models equal, with the first difference named."""
    for part in ("modules", "peft", "tensors"):
        assert list(got[part]) == list(expected[part]), part
        for key, value in expected[part].items():
            assert got[part][key] == value, f"{part}: {key}"


# --- a few Trainer steps (the callback and the patch tests) ---------------------------------------------


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 16) -> None:
        self.ids = token_ids(seed=3, batch=n, length=8)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "labels": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
        }


def training_args(output: Path, max_steps: int, **kwargs: Any) -> TrainingArguments:
    """A checkpoint every two steps, on CPU, quiet, seeded."""
    return TrainingArguments(
        output_dir=str(output),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
