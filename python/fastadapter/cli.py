"""The `fastadapter` command (also `python -m fastadapter`): `convert` and `inspect`. Never imports torch."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from . import _core
from .convert import Conversion, ConvertReport, convert_paths, default_destination, find_checkpoints
from .errors import FastAdapterError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastadapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert torch .bin/.pt/.pth checkpoints to safetensors")
    conv.add_argument("paths", nargs="+", metavar="PATH", help="files, or directories searched recursively")
    conv.add_argument("--jobs", "-j", type=int, default=None, help="files converted at once (default: CPUs)")
    conv.add_argument("--no-verify", action="store_true", help="skip re-reading and comparing the output")
    conv.add_argument("--dry-run", action="store_true", help="list what would be converted, write nothing")
    conv.add_argument("--overwrite", action="store_true", help="replace existing .safetensors outputs")
    conv.add_argument("--no-recursive", action="store_true", help="do not descend into subdirectories")

    insp = sub.add_parser("inspect", help="list a checkpoint's tensors (header only; .safetensors or .bin)")
    insp.add_argument("file")

    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.file, sys.stdout)
    return _convert(args, sys.stdout, sys.stderr)


def _convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    sources = list(find_checkpoints(args.paths, recursive=not args.no_recursive))
    total = sum(os.path.getsize(p) for p in sources if os.path.isfile(p))
    progress = _core.Progress()
    bar = _ProgressBar(progress, total, err) if err.isatty() and not args.dry_run else None

    def on_done(src: str, result: Conversion | BaseException) -> None:
        if bar is None:
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
    _summary(report, time.perf_counter() - start, out)
    return 0 if report.ok else 1


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
        print(f"skipped {len(report.skipped)}:", file=out)
        for src, why in report.skipped:
            print(f"  {src}: {why}", file=out)
    if report.failed:
        print(f"FAILED {len(report.failed)}:", file=out)
        for src, why in report.failed:
            print(f"  {_naming(src, why)}", file=out)


def _naming(src: str, message: str) -> str:
    """Our errors already name the file; add it only where one does not."""
    return message if src in message else f"{src}: {message}"


def _inspect(path: str, out: TextIO) -> int:
    try:
        if path.endswith(".safetensors"):
            file = _core.SafetensorsFile(path)
            rows = [(n, d, s, end - start) for n, d, s, start, end in file.entries()]
            print(f"{path}: safetensors, {len(rows)} tensors, header {file.header_len} bytes", file=out)
            if file.metadata:
                print(f"metadata: {dict(sorted(file.metadata.items()))}", file=out)
        else:
            infos = _core.inspect_torch(path)
            rows = [(n, st or f"torch.{d} (no safetensors dtype)", s, b) for n, d, s, b, st in infos]
            print(f"{path}: torch.save checkpoint, {len(rows)} tensors", file=out)
            print(f"converts to: {default_destination(path)}", file=out)
    except (OSError, FastAdapterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max((len(r[0]) for r in rows), default=4)
    for name, dtype, shape, nbytes in rows:
        print(f"{name:<{width}}  {dtype:<8} {list(shape)!s:<20} {_size(nbytes):>10}", file=out)
    print(f"total: {_size(sum(r[3] for r in rows))}", file=out)
    return 0


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
