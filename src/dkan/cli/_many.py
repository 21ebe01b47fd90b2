"""``dkan predict A.svs B.tif ... --out-dir DIR``: a cohort of slides through :func:`dkan.tl.predict_slides`."""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan import _keys as K

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

logger = logging.getLogger("dkan")

#: Single-store options that predict_slides does not take: refused with --out-dir rather than ignored.
_SINGLE_ONLY = {
    "table_key": "--table-key",
    "image_key": "--image-key",
    "gene_symbols": "--gene-symbols",
}


def check_predict_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse misuse with an argparse error (exit 2); one input without --out-dir keeps ``args.store`` a path."""
    many = args.out_dir is not None
    if not many:
        if len(args.store) > 1:
            parser.error(
                f"predict: {len(args.store)} inputs need --out-dir DIR (one store per slide); --out and "
                "--in-place take one input."
            )
        if args.scheduler is not None:
            parser.error("predict: --scheduler needs --out-dir DIR (it runs a cohort of slides on a Dask cluster).")
        args.store = args.store[0]
        return
    used = [flag for dest, flag in _SINGLE_ONLY.items() if getattr(args, dest) is not None]
    if args.key_added != K.PRED:
        used.append("--key-added")
    if used:
        parser.error(
            f"predict: {', '.join(used)} cannot be used with --out-dir; predict those inputs one by one with --out."
        )


def predict_many(args: argparse.Namespace) -> int:
    """Run the cohort, print the report, one stderr line per failed slide; 1 if any slide failed."""
    import dkan

    client = _client(args.scheduler) if args.scheduler else None
    try:
        with _library_failures_hidden(enabled=not args.debug):
            report = dkan.tl.predict_slides(
                args.store,
                args.model,
                out_dir=args.out_dir,
                um_per_px=args.um_per_px,
                overwrite=args.overwrite,
                errors=args.errors,
                device=args.device,
                batch_size=args.batch_size,
                with_image=args.with_image or None,
                shared_tiles=args.shared_tiles,
                progress=not args.no_progress,
                client=client,
            )
    finally:
        if client is not None:
            client.close()
    print(format_report(report))
    failed = report[report["status"] == "failed"]
    for slide, error in zip(failed["slide"], failed["error"], strict=True):
        text = _one_line(error)
        named = Path(str(slide)).name in text
        print(f"dkan: error: {text}" if named else f"dkan: error: {slide}: {text}", file=sys.stderr)
    return 1 if len(failed) else 0


def format_report(report: pd.DataFrame, *, width: int = 100) -> str:
    """The report as a short table: slide, status and the error's first ``width`` characters."""
    rows = [("slide", "status", "error")]
    for slide, status, error in zip(report["slide"], report["status"], report["error"], strict=True):
        text = _one_line(error)
        rows.append((str(slide), str(status), text if len(text) <= width else text[: width - 3] + "..."))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


def _one_line(error: Any) -> str:
    return " ".join(str(error or "").split())


def _client(address: str) -> Any:
    """``dask.distributed.Client(address)``; a scheduler that cannot be reached is one user error."""
    try:
        from dask.distributed import Client
    except ImportError as err:
        raise ValueError("`--scheduler` needs dask.distributed: pip install 'distributed'.") from err
    try:
        return Client(address, timeout="30s")
    except (OSError, ValueError) as err:
        raise OSError(f"`--scheduler {address}`: could not connect to a Dask scheduler ({err}).") from err


@contextmanager
def _library_failures_hidden(*, enabled: bool) -> Iterator[None]:
    """Drop the library's per-slide failure log records: the command reports each failed slide itself."""

    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.module in ("_slide", "_cohort"))

    if enabled:
        logger.addFilter(keep)
    try:
        yield
    finally:
        if enabled:
            logger.removeFilter(keep)
