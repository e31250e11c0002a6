"""Many adapters on one model: 100 loaded, then switched, deleted and loaded again in a random order, on
each host, give PEFT's outputs at every step (the oracle: a PeftModel doing the same with PEFT's own
`load_adapter` / `set_adapter` / `delete_adapter`); at the end, on a PeftModel the whole model state
(every flag, requires_grad, value and PEFT's bookkeeping) is PEFT's, and on a transformers model the
trainable parameters are PEFT's. Activation touches only the adapters active before and after (the others
are frozen by every activation): this is where that shortcut would show if it were wrong.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

import fastadapter
from helpers import (
    CONFIG,
    SAFETENSORS,
    assert_same_state,
    logits,
    lora_config,
    make_peft,
    model_state,
    tiny_llama,
    token_ids,
)

INPUTS = token_ids()
N = 100
STEPS = 60


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """N adapters of one shape (r=4 on q/v), each with its own weights and alpha."""
    root = tmp_path_factory.mktemp("many")
    template = root / "template"
    make_peft(tiny_llama(), lora_config(), seed=1).save_pretrained(str(template))
    tensors = load_file(str(template / SAFETENSORS))
    config = json.loads((template / CONFIG).read_text())
    dirs = []
    for i in range(N):
        g = torch.Generator().manual_seed(i)
        d = root / f"a{i}"
        d.mkdir()
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tensors.items()}, str(d / SAFETENSORS)
        )
        (d / CONFIG).write_text(json.dumps({**config, "lora_alpha": 4 + i % 7}))
        dirs.append(d)
    return dirs


def _first(host: str, directory: Path) -> nn.Module:
    if host == "peft":
        return PeftModel.from_pretrained(tiny_llama(), str(directory), adapter_name="a0").eval()
    layers = "fastadapter" if host == "fastadapter" else "auto"
    return fastadapter.load(tiny_llama(), directory, "a0", layers=layers).eval()


@pytest.mark.parametrize("host", ["peft", "transformers", "fastadapter"])
def test_100_adapters_loaded_switched_deleted_in_random_order_match_peft(
    adapter_dirs: list[Path], host: str
) -> None:
    oracle = PeftModel.from_pretrained(tiny_llama(), str(adapter_dirs[0]), adapter_name="a0").eval()
    model = _first(host, adapter_dirs[0])

    def load(i: int) -> None:
        oracle.load_adapter(str(adapter_dirs[i]), adapter_name=f"a{i}")
        oracle.set_adapter(f"a{i}", inference_mode=True)  # fastadapter.load activates what it loads
        oracle.eval()
        fastadapter.load(model, adapter_dirs[i], f"a{i}")

    for i in range(1, N):
        load(i)
    torch.testing.assert_close(logits(model, INPUTS), logits(oracle, INPUTS), rtol=1e-5, atol=1e-6)

    rng = random.Random(0)
    held = list(range(N))
    for step in range(STEPS):
        op = rng.choice(["switch", "switch", "delete", "load"])
        if op == "switch" or (op == "delete" and len(held) < 2):
            i = rng.choice(held)
            oracle.set_adapter(f"a{i}")
            fastadapter.set_adapter(model, f"a{i}")
        elif op == "delete":
            i = held.pop(rng.randrange(len(held)))
            oracle.delete_adapter(f"a{i}")
            fastadapter.delete_adapter(model, f"a{i}")
            # PEFT activates the first remaining adapter when the active one goes; make both explicit.
            j = rng.choice(held)
            oracle.set_adapter(f"a{j}")
            fastadapter.set_adapter(model, f"a{j}")
        else:
            i = rng.choice([k for k in range(N) if k not in held] or [None]) if len(held) < N else None
            if i is None:
                continue
            held.append(i)
            load(i)
        expected = logits(oracle, INPUTS)
        torch.testing.assert_close(
            logits(model, INPUTS), expected, rtol=1e-5, atol=1e-6, msg=f"step {step}: {op}"
        )
    if host == "peft":
        assert_same_state(model_state(model), model_state(oracle))
    elif host == "transformers":
        # (fastadapter's own layers keep an adapter loaded for inference frozen when it is activated,
        # where PEFT's set_adapter makes it trainable: their documented rule, so only outputs compare.)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        expected_trainable = sorted(
            n.removeprefix("base_model.model.") for n, p in oracle.named_parameters() if p.requires_grad
        )
        assert trainable == expected_trainable
