"""fastadapter in one minute: same files as PEFT, loadable by PEFT, written faster.

A small Llama is generated from a config (nothing is downloaded), LoRA is added with PEFT, and the
adapter is saved twice: by `fastadapter.save` and by `PeftModel.save_pretrained`. The demo checks the
files are the same, reloads fastadapter's output with PEFT, and times both writers.
Exits non-zero if any file differs or the reloaded model disagrees.
"""

from __future__ import annotations

import os

# No model hub, ever: set before transformers/peft import huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import hashlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import fastadapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CARD = "README.md"
RUNS = 5


def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def add_lora(base: LlamaForCausalLM) -> PeftModel:
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, config)
    # PEFT initialises lora_B to zero; a trained adapter is not, and zeros would hide wrong bytes.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.uniform_(-0.05, 0.05, generator=gen)
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_json(directory: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((directory / CONFIG).read_text())
    # target_modules is a set in PEFT: its list order changes with the hash seed.
    config["target_modules"] = sorted(config["target_modules"])
    return config


def compare_files(ours: Path, peft: Path) -> bool:
    print("1. Same files as PEFT")
    ours_hash, peft_hash = sha256(ours / WEIGHTS), sha256(peft / WEIGHTS)
    same_weights = ours_hash == peft_hash
    print(f"   {WEIGHTS}  sha256 fastadapter {ours_hash[:16]}...")
    print(f"   {' ' * len(WEIGHTS)}  sha256 peft        {peft_hash[:16]}...  -> {_verdict(same_weights)}")
    same_config = config_json(ours) == config_json(peft)
    print(f"   {CONFIG}  equal as JSON (target_modules as a set) -> {_verdict(same_config)}")
    same_card = (ours / CARD).read_bytes() == (peft / CARD).read_bytes()
    print(f"   {CARD}  byte for byte -> {_verdict(same_card)}")
    return same_weights and same_config and same_card


def _verdict(ok: bool) -> str:
    return "identical" if ok else "DIFFERENT"


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=input_ids).logits
    return out


def check_reload(original: PeftModel, fresh_base: LlamaForCausalLM, saved: Path) -> bool:
    print("2. Reload fastadapter's files with PeftModel.from_pretrained")
    input_ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(2))
    # The base alone must disagree, or equal logits would prove nothing about the adapter's weights.
    without_adapter = logits(fresh_base, input_ids)
    reloaded = PeftModel.from_pretrained(fresh_base, str(saved), torch_device="cpu").eval()
    expected, got = logits(original, input_ids), logits(reloaded, input_ids)
    equal = torch.equal(expected, got)
    same, base_only = _max_diff(expected, got), _max_diff(expected, without_adapter)
    print(f"   logits {tuple(got.shape)} equal to the original model's: {equal}")
    print(f"   max abs diff: reloaded {same:g}; base without the adapter {base_only:g}")
    return equal


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def median_ms(fn: Callable[[], object]) -> float:
    fn()  # the first call creates the files; the timed ones overwrite them, as checkpoints do
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_writers(model: PeftModel, root: Path) -> None:
    state_dict = get_peft_model_state_dict(model)  # outside the timing: safetensors' writer alone
    writers: dict[str, Callable[[], object]] = {
        "fastadapter.save": lambda: fastadapter.save(model, root / "t_fastadapter"),
        "PeftModel.save_pretrained": lambda: model.save_pretrained(root / "t_peft"),
        "safetensors save_file": lambda: _save_file(state_dict, root / "t_safetensors"),
    }
    results = {name: median_ms(fn) for name, fn in writers.items()}
    ours = results["fastadapter.save"]
    print(f"3. Save time, median of {RUNS} (noisy machine: compare within this run)")
    print(f"   {'writer':<27} {'ms':>8}  {'time / fastadapter':>18}")
    for name, ms in results.items():
        print(f"   {name:<27} {ms:8.2f}  {ms / ours:17.2f}x")


def _save_file(state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    save_file(state_dict, str(directory / WEIGHTS), metadata={"format": "pt"})


def main() -> int:
    base = build_base()
    pristine = copy.deepcopy(base)  # get_peft_model edits the base in place; the reload needs a clean one
    model = add_lora(base)
    state = get_peft_model_state_dict(model)
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    print("fastadapter demo: generated Llama (hidden 512, 4 layers, vocab 32000, bf16), no downloads")
    print(f"LoRA r=16 on {', '.join(TARGETS)}: {len(state)} tensors, {size_mb:.1f} MB fp32\n")
    with tempfile.TemporaryDirectory(prefix="fastadapter-demo-") as tmp:
        root = Path(tmp)
        fastadapter.save(model, root / "fastadapter")
        model.save_pretrained(root / "peft")
        same = compare_files(root / "fastadapter", root / "peft")
        reloaded_ok = check_reload(model, pristine, root / "fastadapter")
        time_writers(model, root)
    ok = same and reloaded_ok
    verdict = "byte-identical to PEFT" if same else "files differ from PEFT"
    print(f"\n{'OK' if ok else 'FAILED'}: {verdict}" + ("" if reloaded_ok else "; reloaded logits differ"))
    return 0 if ok else 1


if __name__ == "__main__":
    # PEFT touches a deprecated transformers attribute; not ours to fix, and noise in a demo.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    sys.exit(main())
