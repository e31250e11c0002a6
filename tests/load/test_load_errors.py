"""What ``fastadapter.load`` refuses, and that a refused load leaves the model exactly as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastadapter
from helpers import CONFIG, SAFETENSORS, lora_config, make_peft, tiny_llama


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], dict[str, bool]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: Any) -> None:
    state, modules, grads = snapshot(model)
    assert list(state) == list(before[0])
    assert all(torch.equal(state[k], v) for k, v in before[0].items())
    assert modules == before[1]
    assert grads == before[2]
    assert "_fastadapter" not in model.__dict__


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    make_peft(tiny_llama(), lora_config()).save_pretrained(str(directory))
    return directory


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refused(model: nn.Module, directory: Path, error: type[BaseException], match: str) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fastadapter.load(model, directory)
    assert_unchanged(model, before)


def test_missing_directory_and_files(tmp_path: Path, adapter_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        fastadapter.load(tiny_llama(), tmp_path / "nowhere")
    assert e.value.filename == str(tmp_path / "nowhere")
    (adapter_dir / SAFETENSORS).unlink()
    refused(tiny_llama(), adapter_dir, FileNotFoundError, "adapter_model")
    (adapter_dir / CONFIG).unlink()
    with pytest.raises(FileNotFoundError) as e:
        fastadapter.load(tiny_llama(), adapter_dir)
    assert e.value.filename == str(adapter_dir / CONFIG)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"use_qalora": True}, "use_qalora"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"eva_config": {"rho": 2.0}}, "eva_config"),
        ({"a_future_option": 3}, "a_future_option"),
    ],
)
def test_unsupported_options_are_refused_by_name(
    adapter_dir: Path, changes: dict[str, Any], match: str
) -> None:
    edit_config(adapter_dir, **changes)
    refused(tiny_llama(), adapter_dir, fastadapter.UnsupportedAdapterError, match)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": "eight"}, "`r`"),
        ({"lora_alpha": None}, "`lora_alpha`"),
        ({"target_modules": None}, "`target_modules`"),
        ({"target_modules": "(unclosed"}, "`target_modules`"),
        ({"rank_pattern": {"q_proj": -1}}, "`rank_pattern`"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
    ],
)
def test_malformed_config_names_the_field(adapter_dir: Path, changes: dict[str, Any], match: str) -> None:
    edit_config(adapter_dir, **changes)
    refused(tiny_llama(), adapter_dir, fastadapter.ConfigError, match)


def test_not_json(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG).write_text("{not json")
    refused(tiny_llama(), adapter_dir, fastadapter.ConfigError, "not valid JSON")


def test_inject_refuses_an_adapter_name_already_present(adapter_dir: Path) -> None:
    # (load into a present name replaces its weights in place: tests/test_load_existing.py)
    model = fastadapter.load(tiny_llama(), adapter_dir, layers="fastadapter")
    before = snapshot(model)
    with pytest.raises(fastadapter.AdapterExistsError, match="'default'"):
        fastadapter.inject(model, lora_config())
    assert isinstance(fastadapter.AdapterExistsError("x"), ValueError)
    state = snapshot(model)
    assert list(state[0]) == list(before[0])
    assert state[1] == before[1]


def test_target_module_absent_from_the_model(adapter_dir: Path) -> None:
    edit_config(adapter_dir, target_modules=["no_such_proj"])
    refused(tiny_llama(), adapter_dir, fastadapter.TargetModuleError, "no_such_proj")


def test_tensor_for_a_module_the_model_lacks(adapter_dir: Path) -> None:
    path = adapter_dir / SAFETENSORS
    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    refused(tiny_llama(), adapter_dir, fastadapter.TargetModuleError, r"layers\.9\.self_attn\.q_proj")


def test_shape_that_does_not_fit_names_both_shapes(adapter_dir: Path) -> None:
    path = adapter_dir / SAFETENSORS
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(17, 4)
    save_file(tensors, str(path), metadata={"format": "pt"})
    # The last target in the model's order fails: every earlier one was already checked and not installed.
    refused(tiny_llama(), adapter_dir, fastadapter.TensorError, r"\[17, 4\].*\[16, 4\]")


def test_missing_tensor(adapter_dir: Path) -> None:
    path = adapter_dir / SAFETENSORS
    tensors = load_file(str(path))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    refused(tiny_llama(), adapter_dir, fastadapter.MissingTensorError, "v_proj")


def test_malformed_safetensors(adapter_dir: Path) -> None:
    (adapter_dir / SAFETENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}  ")
    refused(tiny_llama(), adapter_dir, fastadapter.HeaderError, "adapter_model.safetensors")


NO_PEFT = textwrap.dedent(
    """
    import sys
    sys.modules["peft"] = None  # `import peft` now raises ImportError
    import torch
    from torch import nn
    import fastadapter

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)
        def forward(self, x):
            return self.head(torch.relu(self.proj(self.emb(x))))

    def build():
        torch.manual_seed(0)
        return Net().eval()

    try:
        import peft  # noqa: F401
        raise SystemExit("peft is importable")
    except ImportError:
        pass
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["emb", "proj"], "modules_to_save": ["head"],
              "use_rslora": True}
    model = fastadapter.inject(build(), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    out = sys.argv[1]
    fastadapter.save(model, out)
    x = torch.tensor([[1, 2, 3]])
    loaded = fastadapter.load(build(), out).eval()
    assert torch.equal(loaded(x), model.eval()(x))
    assert "peft" not in [m for m in sys.modules if sys.modules[m] is not None]
    print("ok")
    """
)


def test_works_without_peft(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", NO_PEFT, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    # And PEFT reads what was written without it.
    config = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["use_rslora"] is True
    assert (tmp_path / "out" / "README.md").is_file()
