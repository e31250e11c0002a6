"""pytest plugin for running PEFT's own test suite against `fastadapter.patch()` (`make test-peft`).

Always: deselects the node ids listed in `deselect.txt` (tests that need the Hub), and writes every test's
outcome to the JSON file given by `--fastadapter-outcomes`.

With `--fastadapter-patch`: applies `fastadapter.patch()` before any test module is imported, and checks
every save fastadapter ran against a shadow save by the original function into a temporary directory:
adapter_model.safetensors and README.md byte for byte, adapter_config.json as JSON (a list PEFT wrote from
a set compared as a set: PEFT writes sets in hash order, fastadapter sorted), .bin files tensor by tensor
and type by type (torch.save stores a random id, so no two .bin files are byte-identical). A difference
fails the test that saved. The patch report and the number of shadow comparisons go to the JSON file too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
_outcomes: dict[str, str] = {}
_shadow = {"compared": 0, "files": 0}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastadapter")
    group.addoption("--fastadapter-patch", action="store_true", help="run with fastadapter.patch() applied")
    group.addoption("--fastadapter-outcomes", default=None, help="write outcomes and the report here (JSON)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fastadapter-patch"):
        import fastadapter

        fastadapter.patch()
        _install_shadow_checks()


def deselected_ids() -> dict[str, str]:
    """`deselect.txt`: one node id per line, then `#` and the reason."""
    out: dict[str, str] = {}
    for line in (HERE / "deselect.txt").read_text().splitlines():
        node, _, reason = line.partition("#")
        if node.strip():
            out[node.strip()] = reason.strip()
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    listed = deselected_ids()
    keep = [item for item in items if item.nodeid not in listed]
    dropped = [item for item in items if item.nodeid in listed]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid)
        if previous in (None, "passed"):
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--fastadapter-outcomes")
    result: dict[str, Any] = {"outcomes": _outcomes, "shadow": _shadow}
    if session.config.getoption("--fastadapter-patch"):
        import fastadapter

        report = fastadapter.patch_report()
        result["routed"] = dict(report.routed)
        result["fallbacks"] = [[call, reason, n] for (call, reason), n in report.fallbacks.items()]
    if path:
        Path(path).write_text(json.dumps(result, indent=1))


# --- shadow saves ---------------------------------------------------------------------------------------


def _install_shadow_checks() -> None:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from fastadapter.integrations._patch_sites import originals

    for owner, call in (
        (PeftModel, "PeftModel.save_pretrained"),
        (PreTrainedModel, "PreTrainedModel.save_pretrained"),
    ):
        owner.save_pretrained = _checked(owner.save_pretrained, originals()[call], call)


def _checked(patched: Any, original: Any, call: str) -> Any:
    import fastadapter

    @functools.wraps(patched)
    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        before = fastadapter.patch_report().routed[call]
        card = Path(save_directory, "README.md")
        existing_card = card.read_bytes() if card.is_file() else None
        result = patched(self, save_directory, *args, **kwargs)
        if fastadapter.patch_report().routed[call] == before:
            return result  # the original ran: nothing to compare
        shadow = Path(tempfile.mkdtemp(prefix="fastadapter-shadow-"))
        try:
            if existing_card is not None:
                (shadow / "README.md").write_bytes(existing_card)
            original(self, str(shadow), *args, **kwargs)
            _assert_same_files(Path(save_directory), shadow, call)
        finally:
            shutil.rmtree(shadow, ignore_errors=True)
        return result

    return save_pretrained


def _assert_same_files(ours: Path, theirs: Path, call: str) -> None:
    _shadow["compared"] += 1
    for path in sorted(theirs.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(theirs)
        mine = ours / rel
        assert mine.is_file(), f"{call} routed to fastadapter did not write {rel}"
        _shadow["files"] += 1
        if path.suffix == ".json":
            _assert_same_json(json.loads(mine.read_text()), json.loads(path.read_text()), f"{call}: {rel}")
        elif path.suffix == ".bin":
            _assert_same_bin(mine, path, f"{call}: {rel}")
        else:
            assert mine.read_bytes() == path.read_bytes(), f"{call}: {rel} differs from the original's"


def _assert_same_json(mine: Any, theirs: Any, where: str) -> None:
    assert type(mine) is type(theirs), where
    if isinstance(theirs, dict):
        assert sorted(mine) == sorted(theirs), where
        for key in theirs:
            _assert_same_json(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list) and mine != theirs:
        # A set written as a list: same members, ours in sorted order.
        assert sorted(map(repr, mine)) == sorted(map(repr, theirs)), where
        assert mine == sorted(mine, key=_order), f"{where}: not sorted"
    else:
        assert mine == theirs, where


def _order(value: Any) -> Any:
    return (0, value) if isinstance(value, str) else (1, repr(value))


def _assert_same_bin(mine: Path, theirs: Path, where: str) -> None:
    import torch

    a = torch.load(mine, weights_only=True)
    b = torch.load(theirs, weights_only=True)
    assert list(a) == list(b), where
    for key, expected in b.items():
        got = a[key]
        assert type(got) is type(expected), f"{where}: {key} is a {type(got).__name__}"
        assert got.dtype == expected.dtype, f"{where}: {key}"
        assert got.shape == expected.shape, f"{where}: {key}"
        assert torch.equal(got, expected), f"{where}: {key}"


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
