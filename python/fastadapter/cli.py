"""The `fastadapter` command (also `python -m fastadapter`): `convert` and `inspect`. Never imports torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import _core
from .convert import Conversion, ConvertReport, convert_paths, default_destination, find_checkpoints
from .errors import FastAdapterError

# Exit status of a command whose output pipe was closed early (`| head`): 128 + SIGPIPE, what a shell
# reports for `cat` in the same place.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a file failed, 2 usage, 141 closed pipe)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`fastadapter inspect f | head`): stop quietly, like the tools people pipe.
        # stdout is pointed at /dev/null so that the interpreter's own flush at exit cannot raise again.
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fastadapter", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_core.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert torch .bin/.pt/.pth checkpoints to safetensors")
    conv.add_argument("paths", nargs="+", metavar="PATH", help="files, or directories searched recursively")
    conv.add_argument(
        "--jobs", "-j", type=_positive, default=None, help="files converted at once (default: CPUs)"
    )
    conv.add_argument("--no-verify", action="store_true", help="skip re-reading and comparing the output")
    conv.add_argument("--dry-run", action="store_true", help="list what would be converted, write nothing")
    conv.add_argument("--overwrite", action="store_true", help="replace existing .safetensors outputs")
    conv.add_argument("--no-recursive", action="store_true", help="do not descend into subdirectories")
    conv.add_argument("--json", action="store_true", help="one JSON object per file on stdout (JSON Lines)")

    insp = sub.add_parser("inspect", help="list a checkpoint's tensors (header only; .safetensors or .bin)")
    insp.add_argument("files", nargs="+", metavar="FILE")
    insp.add_argument("--json", action="store_true", help="one JSON object per file on stdout (JSON Lines)")

    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.files, sys.stdout, sys.stderr, as_json=args.json)
    return _convert(args, sys.stdout, sys.stderr)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a descriptor (captured): nothing left to flush
        pass


def _convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sources = list(find_checkpoints(args.paths, recursive=not args.no_recursive))
    total = sum(os.path.getsize(p) for p in sources if os.path.isfile(p))
    progress = _core.Progress()
    show_bar = err.isatty() and not args.dry_run and not args.json
    bar = _ProgressBar(progress, total, err) if show_bar else None

    def on_done(src: str, result: Conversion | BaseException) -> None:
        if bar is None and not args.json:
            line = f"{src}: ok" if isinstance(result, Conversion) else f"FAILED: {_naming(src, str(result))}"
            print(line, file=err, flush=True)

    start = time.perf_counter()
    if bar is not None:
        bar.start()
    try:
        report = convert_paths(
            args.paths,
            jobs=args.jobs,
            recursive=not args.no_recursive,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            progress=progress,
            on_done=on_done,
        )
    finally:
        if bar is not None:
            bar.stop()
    if args.json:
        _json_lines(_convert_records(report), out)
    else:
        _summary(report, time.perf_counter() - start, out)
    return 0 if report.ok else 1


def _convert_records(report: ConvertReport) -> list[dict[str, Any]]:
    """One record per file, whatever happened to it: planned (dry run), skipped, converted or failed."""
    records: list[dict[str, Any]] = []
    for src, dst in report.planned:
        records.append(_record(src, dst, "planned", bytes=os.path.getsize(src)))
    existing = dict(report.existing)
    for src, why in report.skipped:
        if src in existing:
            records.append(_record(src, existing[src], "skipped", reason=_EXISTS_HINT))
        else:
            records.append(_record(src, None, "skipped", reason=why))
    for c in report.converted:
        left_out = [{"name": name, "type": kind} for name, kind in c.skipped]
        extra = {"tensors": c.tensors, "seconds": round(c.seconds, 6), "left_out": left_out}
        records.append(_record(c.src, c.dst, "converted", bytes=c.bytes, **extra))
    for src, why in report.failed:
        records.append(_record(src, _destination_or_none(src), "failed", error=_naming(src, why)))
    return records


def _record(src: str, dst: str | None, status: str, **fields: Any) -> dict[str, Any]:
    return {"source": src, "destination": dst, "status": status, **fields}


def _destination_or_none(src: str) -> str | None:
    try:
        return default_destination(src)
    except ValueError:  # e.g. a sharded checkpoint's index, which has no destination of its own
        return None


def _json_lines(records: list[dict[str, Any]], out: TextIO) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


# What the command says where the library says "pass overwrite=True": the flag a user can type.
_EXISTS_HINT = "destination exists (use --overwrite to replace it)"


def _summary(report: ConvertReport, seconds: float, out: TextIO) -> None:
    for src, dst in report.planned:
        print(f"would convert {src} -> {dst} ({_size(os.path.getsize(src))})", file=out)
    n, nbytes = len(report.converted), report.bytes
    rate = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    print(f"converted {n} file(s), {_size(nbytes)} in {seconds:.2f} s ({rate:.2f} GB/s)", file=out)
    for conversion in report.converted:
        if conversion.skipped:
            names = ", ".join(f"{name} ({kind})" for name, kind in conversion.skipped)
            print(f"  {conversion.src}: left out non-tensor entries: {names}", file=out)
    if report.skipped:
        existing = dict(report.existing)
        print(f"skipped {len(report.skipped)}:", file=out)
        for src, why in report.skipped:
            reason = f"{existing[src]}: {_EXISTS_HINT}" if src in existing else why
            print(f"  {src}: {reason}", file=out)
    if report.failed:
        print(f"FAILED {len(report.failed)}:", file=out)
        for src, why in report.failed:
            print(f"  {_naming(src, why)}", file=out)


def _naming(src: str, message: str) -> str:
    """Our errors already name the file; add it only where one does not."""
    return message if src in message else f"{src}: {message}"


def _inspect(paths: list[str], out: TextIO, err: TextIO, *, as_json: bool) -> int:
    status = 0
    show: Callable[[dict[str, Any], TextIO], None] = _show_json if as_json else _show_table
    for path in paths:
        try:
            info = _inspect_one(path)
        except (OSError, FastAdapterError, ValueError) as e:
            print(f"error: {e}", file=err, flush=True)
            if as_json:
                _json_lines([{"path": path, "error": str(e)}], out)
            status = 1
            continue
        show(info, out)
    return status


def _inspect_one(path: str) -> dict[str, Any]:
    """A file's tensors from its header (safetensors) or its pickle (torch.save); no tensor data read."""
    if path.endswith(".safetensors"):
        file = _core.SafetensorsFile(path)
        tensors = [_tensor(n, d, s, end - start) for n, d, s, start, end in file.entries()]
        info: dict[str, Any] = {"format": "safetensors", "header_bytes": file.header_len}
        info["metadata"] = dict(sorted(file.metadata.items())) if file.metadata else {}
    else:
        rows = _core.inspect_torch(path)
        tensors = [_tensor(n, st, s, b, torch_dtype=f"torch.{d}") for n, d, s, b, st in rows]
        info = {"format": "torch", "converts_to": default_destination(path)}
    total = sum(t["bytes"] for t in tensors)
    return {"path": path, **info, "tensors": tensors, "total_bytes": total}


def _tensor(name: str, dtype: str | None, shape: Sequence[int], nbytes: int, **extra: str) -> dict[str, Any]:
    """`dtype` is the safetensors dtype, None for a torch dtype safetensors cannot hold (then
    `torch_dtype` says which)."""
    return {"name": name, "dtype": dtype, "shape": list(shape), "bytes": nbytes, **extra}


def _show_json(info: dict[str, Any], out: TextIO) -> None:
    _json_lines([info], out)


def _show_table(info: dict[str, Any], out: TextIO) -> None:
    path, tensors = info["path"], info["tensors"]
    if info["format"] == "safetensors":
        print(f"{path}: safetensors, {len(tensors)} tensors, header {info['header_bytes']} bytes", file=out)
        if info["metadata"]:
            print(f"metadata: {info['metadata']}", file=out)
    else:
        print(f"{path}: torch.save checkpoint, {len(tensors)} tensors", file=out)
        print(f"converts to: {info['converts_to']}", file=out)
    width = max((len(t["name"]) for t in tensors), default=4)
    for t in tensors:
        dtype = t["dtype"] or f"{t['torch_dtype']} (no safetensors dtype)"
        print(f"{t['name']:<{width}}  {dtype:<8} {t['shape']!s:<20} {_size(t['bytes']):>10}", file=out)
    print(f"total: {_size(info['total_bytes'])}", file=out)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


class _ProgressBar:
    """Redraws one line on a terminal from the byte counter the Rust writer increments."""

    def __init__(self, progress: _core.Progress, total: int, stream: TextIO) -> None:
        self._progress, self._total, self._stream = progress, max(total, 1), stream
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._draw()
        self._stream.write("\n")

    def _run(self) -> None:
        while not self._done.wait(0.1):
            self._draw()

    def _draw(self) -> None:
        done = min(self._progress.value, self._total)
        fraction = done / self._total
        elapsed = time.perf_counter() - self._start
        rate = done / elapsed / 1e9 if elapsed > 0 else 0.0
        bar = "#" * int(30 * fraction)
        self._stream.write(
            f"\r[{bar:<30}] {fraction:6.1%} {_size(done)} / {_size(self._total)} {rate:.2f} GB/s"
        )
        self._stream.flush()
