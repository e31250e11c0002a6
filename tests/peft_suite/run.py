"""`make test-peft`: PEFT's own save/load tests, run once plainly and once with `fastadapter.patch()`.

Usage: run.py PYTHON PEFT_SOURCE_DIR OUT_DIR -- PYTEST_ARGS...

PYTHON runs pytest (an environment with PEFT's test dependencies); PEFT_SOURCE_DIR is the unpacked sdist.
Fails unless every test that passes plainly passes patched, every routed save wrote what PEFT's
original writes (shadow saves, see `fastadapter_patch_plugin.py`), and LoRA saves and loads were routed
(a patch that routes nothing would pass trivially).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Must be routed in the patched pass: fastadapter's LoRA saves and loads.
MUST_ROUTE = ("PeftModel.save_pretrained", "PeftModel.from_pretrained", "PeftModel.load_adapter")


def run_pass(
    python: str, source: Path, out: Path, name: str, args: list[str], patched: bool
) -> dict[str, Any]:
    outcomes = out / f"{name}.json"
    command = [
        python,
        "-m",
        "pytest",
        "-o",
        "addopts=",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "fastadapter_patch_plugin",
        f"--fastadapter-outcomes={outcomes}",
        *(["--fastadapter-patch"] if patched else []),
        *args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    result: dict[str, Any] = json.loads(outcomes.read_text())
    result["seconds"] = time.monotonic() - started
    return result


def main(argv: list[str]) -> int:
    split = argv.index("--")
    # pytest runs in the PEFT source directory: every path it is given must be absolute.
    python, source, out = os.path.abspath(argv[1]), Path(argv[2]).resolve(), Path(argv[3]).resolve()
    args = argv[split + 1 :]
    out.mkdir(parents=True, exist_ok=True)
    plain = run_pass(python, source, out, "plain", args, patched=False)
    patched = run_pass(python, source, out, "patched", args, patched=True)

    def passed(result: dict[str, Any]) -> set[str]:
        return {node for node, outcome in result["outcomes"].items() if outcome == "passed"}

    plain_passed, patched_passed = passed(plain), passed(patched)
    lost = sorted(plain_passed - patched_passed)
    routed: dict[str, int] = patched.get("routed", {})
    fallbacks: dict[str, int] = {}
    for call, _, n in patched.get("fallbacks", []):
        fallbacks[call] = fallbacks.get(call, 0) + n
    print(f"PEFT suite ({out}): logs plain.log, patched.log")
    for name, result, ok in (("unpatched", plain, plain_passed), ("patched", patched, patched_passed)):
        run = len(result["outcomes"])
        print(f"  {name:9s}: {len(ok)} passed of {run} run ({result['seconds']:.0f} s)")
    for call in sorted({*routed, *fallbacks}):
        print(f"  {call}: {routed.get(call, 0)} routed, {fallbacks.get(call, 0)} fell back")
    reasons = sorted(patched.get("fallbacks", []), key=lambda f: -f[2])
    for call, reason, n in reasons[:15]:
        print(f"    {n:6d}  {call}: {reason}")
    shadow = patched["shadow"]
    print(f"  shadow saves compared with PEFT's original: {shadow['compared']} ({shadow['files']} files)")
    failures = [f"passed unpatched, not patched: {node}" for node in lost]
    failures += [f"{call} was never routed to fastadapter" for call in MUST_ROUTE if not routed.get(call)]
    if not shadow["compared"]:
        failures.append("no routed save was compared with PEFT's original")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
