"""fastadapter's whole job in well under a minute, on generated models (nothing is downloaded):

1. save       a LoRA adapter: files byte-identical to `PeftModel.save_pretrained`, time against it
2. load       it into a fresh model: logits equal to the trained model's, time until every adapter
              weight is resident, against `PeftModel.from_pretrained`
3. convert    a generated `pytorch_model.bin` to safetensors without torch (the command line, in a
              process that never imports torch), against `torch.load` + `save_file`; then a hostile
              `.bin` (its pickle calls `os.system`) is refused, and its command never runs
4. checkpoint a few training steps saved with `Checkpointer`: how long the loop stalls per save,
              against `save_pretrained`; the last checkpoint is checked against PEFT's own save

It ends with one table of the ratios and an OK/FAILED line; the exit status is 1 if any check failed.
Timings are medians on a possibly busy machine: compare the ratios, which come from one run.
"""

from __future__ import annotations

import os

# No model hub, ever: set before transformers/peft import huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import fastadapter
from fastadapter import Checkpointer
from fastadapter.errors import UnsafeCheckpointError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
RUNS = 5
VOCAB = 8000
STEPS = 6


@dataclass
class Row:
    job: str
    ours: float  # ms
    peer: float  # ms
    peer_name: str
    ok: bool
    check: str


def build_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def add_lora(base: LlamaForCausalLM) -> PeftModel:
    config = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, config)
    # PEFT initialises lora_B to zero; a trained adapter is not, and zeros would hide wrong bytes.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.uniform_(-0.05, 0.05, generator=gen)
    return model.eval()


def median_ms(fn: Callable[[int], object], setup: Callable[[int], object] = lambda _: None) -> float:
    """Median of RUNS timed calls of fn(i); setup(i) runs before each, untimed."""
    times = []
    for i in range(RUNS):
        setup(i)
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=input_ids).logits
    return out


def touch_adapter(model: torch.nn.Module) -> float:
    """Reads one value per 4 KiB page of every adapter weight: a load is done when its weights are
    resident in memory, not just mapped."""
    lora = [p.detach().reshape(-1) for n, p in model.named_parameters() if "lora_" in n]
    return float(sum(p[:: 4096 // p.element_size()].float().sum() for p in lora))


# --- 1. save ---------------------------------------------------------------------------------------


def demo_save(model: PeftModel, root: Path) -> Row:
    print("1. save: fastadapter.save vs PeftModel.save_pretrained, each into a new directory")
    fastadapter.save(model, root / "ours")
    model.save_pretrained(str(root / "peft"))
    same = (root / "ours" / WEIGHTS).read_bytes() == (root / "peft" / WEIGHTS).read_bytes()
    size = (root / "ours" / WEIGHTS).stat().st_size
    print(f"   {WEIGHTS}: {size / 1e6:.1f} MB, byte-identical to PEFT's: {same}")

    def fresh(name: str) -> Callable[[int], None]:
        def setup(i: int) -> None:
            shutil.rmtree(root / f"{name}-{i - 1}", ignore_errors=True)
            os.sync()

        return setup

    ours = median_ms(lambda i: fastadapter.save(model, root / f"ours-{i}"), fresh("ours"))
    peft = median_ms(lambda i: model.save_pretrained(str(root / f"peft-{i}")), fresh("peft"))
    print(f"   median of {RUNS}: fastadapter {ours:.1f} ms, PEFT {peft:.1f} ms\n")
    return Row("save", ours, peft, "save_pretrained", same, "bytes identical to PEFT")


# --- 2. load ---------------------------------------------------------------------------------------


def demo_load(trained: PeftModel, pristine: LlamaForCausalLM, saved: Path) -> Row:
    print("2. load: fastadapter.load(model, dir) vs PeftModel.from_pretrained, until weights are resident")
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    expected = logits(trained, input_ids)
    bases = [copy.deepcopy(pristine) for _ in range(2 * RUNS + 1)]  # copies made outside the timing

    loaded = fastadapter.load(bases.pop(), saved)
    equal = torch.equal(logits(loaded, input_ids), expected)
    # The base alone must differ, or equal logits would prove nothing about the adapter's weights.
    differs_without = not torch.equal(logits(pristine, input_ids), expected)
    print(f"   logits equal to the trained model's: {equal} (the base alone differs: {differs_without})")

    ours = median_ms(lambda _: touch_adapter(fastadapter.load(bases.pop(), saved)))
    peft = median_ms(lambda _: touch_adapter(PeftModel.from_pretrained(bases.pop(), str(saved))))
    print(f"   median of {RUNS}: fastadapter {ours:.1f} ms, PEFT {peft:.1f} ms\n")
    return Row(
        "load", ours, peft, "from_pretrained", equal and differs_without, "logits equal to trained model"
    )


# --- 3. convert ------------------------------------------------------------------------------------

# The conversion runs as the command line does, in a process that must never import torch.
TORCH_FREE = (
    "import sys, time\n"
    "from fastadapter import cli\n"
    "start = time.perf_counter()\n"
    "status = cli.main(['convert', '--json', '--overwrite', sys.argv[1]])\n"
    "print(f'ms {(time.perf_counter() - start) * 1e3:.3f}')\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "sys.exit(status)\n"
)


class Hostile:
    """Pickled as a call to os.system: what a malicious checkpoint runs in an unsafe `torch.load`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def demo_convert(base: LlamaForCausalLM, root: Path) -> Row:
    print("3. convert: a generated pytorch_model.bin to model.safetensors, without torch")
    src = root / "bin" / "pytorch_model.bin"
    src.parent.mkdir()
    state = {k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, src)
    print(f"   {src.name}: {src.stat().st_size / 1e6:.0f} MB, {len(state)} tensors (bf16)")

    def ours_once() -> float:
        done = subprocess.run(
            [sys.executable, "-c", TORCH_FREE, str(src)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"conversion failed: {done.stdout}{done.stderr}")
        return float(done.stdout.split("ms ")[-1])

    def torch_once(i: int) -> None:
        loaded = torch.load(src, weights_only=True, mmap=True)
        save_file(loaded, str(root / "bin" / f"torch-{i}.safetensors"), metadata={"format": "pt"})

    ours = statistics.median(ours_once() for _ in range(RUNS))  # timed inside the torch-free process
    peer = median_ms(torch_once)
    got, want = load_file(root / "bin" / "model.safetensors"), torch.load(src, weights_only=True)
    equal = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    print(f"   tensors equal to torch.load's: {equal}; no torch imported by the converter")
    print(f"   median of {RUNS}: fastadapter {ours:.1f} ms, torch.load + save_file {peer:.1f} ms")

    marker = root / "pwned"
    evil = root / "bin" / "evil.bin"
    torch.save({"w": torch.ones(2), "payload": Hostile(marker)}, evil)
    try:
        fastadapter.convert(evil)
        refused = False
        print("   hostile .bin: CONVERTED (it should have been refused)")
    except UnsafeCheckpointError as e:
        refused = True
        print(f"   hostile .bin refused: {type(e).__name__}: {e}")
    ran = marker.exists()
    print(f"   its command ran: {ran}\n")
    ok = equal and refused and not ran
    return Row("convert", ours, peer, "torch.load+save_file", ok, "equal to torch.load; hostile refused")


# --- 4. checkpoint ---------------------------------------------------------------------------------


def train_step(model: PeftModel, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> None:
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def demo_checkpoint(model: PeftModel, root: Path) -> Row:
    print(f"4. checkpoint: {STEPS} training steps, a save after each; stall = time the loop waits")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    ours_stalls, peer_stalls = [], []
    with Checkpointer(root / "ck", keep_last=2) as ck:
        for step in range(1, STEPS + 1):
            train_step(model, optimizer, input_ids)
            start = time.perf_counter()
            ck.save(step, model)
            ours_stalls.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.save_pretrained(str(root / "pretrained" / f"checkpoint-{step}"))
            peer_stalls.append(time.perf_counter() - start)
        ck.wait()
        last = Path(root / "ck" / f"checkpoint-{ck.latest()}")
        kept = ck.steps()
    same = (last / WEIGHTS).read_bytes() == (
        root / "pretrained" / f"checkpoint-{STEPS}" / WEIGHTS
    ).read_bytes()
    print(f"   checkpoints kept: {kept}; the last one byte-identical to save_pretrained's: {same}")
    ours, peer = statistics.median(ours_stalls) * 1e3, statistics.median(peer_stalls) * 1e3
    print(f"   median stall per save: Checkpointer {ours:.1f} ms, save_pretrained {peer:.1f} ms\n")
    model.eval()
    ok = same and kept == [STEPS - 1, STEPS]
    return Row("checkpoint", ours, peer, "save_pretrained", ok, "last checkpoint = PEFT's save")


# --- summary ---------------------------------------------------------------------------------------


def summary(rows: list[Row]) -> bool:
    print("summary (times are medians; ratio = peer / fastadapter, >1: fastadapter is faster)")
    print(f"   {'job':<11}{'fastadapter':>12}{'peer':>11}  {'peer is':<22}{'ratio':>7}  check")
    for r in rows:
        verdict = "ok" if r.ok else "FAILED"
        print(
            f"   {r.job:<11}{r.ours:>9.1f} ms{r.peer:>8.1f} ms  {r.peer_name:<22}"
            f"{r.peer / r.ours:>6.1f}x  {verdict}: {r.check}"
        )
    failed = [r.job for r in rows if not r.ok]
    print("\n" + ("OK: every check passed" if not failed else f"FAILED: {', '.join(failed)}"))
    return not failed


def main() -> int:
    started = time.perf_counter()
    base = build_base()
    pristine = copy.deepcopy(base)  # get_peft_model edits the base in place; the loads need clean ones
    model = add_lora(base)
    print(f"fastadapter demo: a generated Llama (hidden 1024, 4 layers, vocab {VOCAB}, bf16), no downloads;")
    print(f"LoRA r=64 on {', '.join(TARGETS)}\n")
    with tempfile.TemporaryDirectory(prefix="fastadapter-demo-") as tmp:
        root = Path(tmp)
        rows = [demo_save(model, root), demo_load(model, pristine, root / "ours")]
        rows.append(demo_convert(pristine, root))
        rows.append(demo_checkpoint(model, root))
        ok = summary(rows)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    # PEFT touches a deprecated transformers attribute; not ours to fix, and noise in a demo.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    sys.exit(main())
