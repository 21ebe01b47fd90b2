"""Command line: ``dkan train`` and ``dkan predict`` on SpatialData zarr stores (thin wrappers of ``dkan.tl``).

Examples
--------
.. code-block:: bash

    dkan train slides.zarr --out model/ --config her2st --set max_epochs=50 --descriptions genes.tsv
    dkan predict new_slide.zarr --model model/ --out new_slide_pred.zarr
    dkan predict new_slide.zarr --model model/ --in-place
    dkan predict a.svs b.tif c.ndpi --model model/ --out-dir preds/ [--scheduler tcp://host:8786]

Writing is never half-done where it can be avoided: ``train`` leaves its input store untouched and saves the
model folder atomically; ``predict --out`` writes the whole store to a temporary sibling path and renames it
into place (an existing store is swapped in one step, see :mod:`dkan.io._store_write`); ``predict --in-place``
first writes a backup copy of the updated table next to the store, then replaces the table element
(``delete_element_from_disk`` + ``write_element``, spatialdata's pattern) and finally removes the backup. What a
killed run leaves (temporary stores, a store set aside, a backup) is cleaned up or finished by the next run on
the same path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan._utils import error_line
from dkan.cli import _many, _parser
from dkan.io._store_read import is_store, read_slide, read_store, record_source
from dkan.io._store_write import (
    check_replaceable_store,
    recover_store,
    restore_backups,
    update_in_place,
    write_new_store,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: Exceptions that are user errors: reported as one line ``dkan: error: ...`` (``--debug`` shows the traceback).
#: OSError covers files and folders that cannot be read or written (missing, no permission, not decodable).
_USER_ERRORS = (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError, OSError)


# ----------------------------------------------------------------------------------------- parser
# ----------------------------------------------------------------------------------------- helpers
def build_parser() -> argparse.ArgumentParser:
    """The ``dkan`` argument parser: subcommands ``train`` and ``predict`` (see :mod:`dkan.cli._parser`)."""
    return _parser.build_parser(train=_train, predict=_predict)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["max_epochs=5", "feature_encoder=dummy"]`` -> ``{"max_epochs": 5, "feature_encoder": "dummy"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"`--set {item}` must have the form KEY=VALUE, e.g. `--set max_epochs=5`.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def check_override_keys(overrides: Mapping[str, Any]) -> None:
    """Refuse ``--set`` keys that are not configuration fields, naming the closest ones (difflib)."""
    import difflib

    from dkan._config import DKANConfig

    fields = list(DKANConfig.field_names())
    unknown = [key for key in overrides if key not in fields]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=3)
        hints.append(f"`{key}`" + (f" (did you mean {' or '.join(f'`{c}`' for c in close)}?)" if close else ""))
    raise ValueError(
        f"`--set` names {len(unknown)} unknown configuration field(s): {', '.join(hints)}. "
        "`dkan train --help` lists the fields (documented in dkan.DKANConfig)."
    )


def _config(value: str | None) -> Any:
    """A preset name, or the mapping of a JSON file."""
    if value is None or not value.endswith(".json"):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"`--config {value}` looks like a JSON file but does not exist.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"`--config {value}` is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the "
            "file or pass a preset name."
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"`--config {value}` is not UTF-8 text; pass a JSON file of configuration fields.") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"`--config {value}` must hold a JSON object of configuration fields; found {type(data).__name__}."
        )
    return data


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logger.setLevel(level)
    # tifffile logs what it cannot parse in a damaged file as errors; the failure is reported by dkan as one line
    logging.getLogger("tifffile").setLevel(logging.DEBUG if args.debug else logging.CRITICAL)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


# ----------------------------------------------------------------------------------------- commands
def _train(args: argparse.Namespace) -> int:
    import dkan
    from dkan.train._store import check_target

    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"`--out {args.out}` exists; pass --overwrite to replace it.")
    check_target(args.out, overwrite=True)  # before training: refuse a folder that is not a dkan model up front
    overrides = parse_overrides(args.overrides)
    check_override_keys(overrides)  # before reading the store
    config = _config(args.config)  # likewise: a bad JSON file fails at once
    sdata = read_store(args.store)
    model = dkan.tl.train(
        sdata,
        config=config,
        device=args.device,
        table_key=args.table_key,
        image_key=args.image_key,
        descriptions=args.descriptions,
        gene_info=args.gene_info,
        gene_symbols=args.gene_symbols,
        checkpoint=args.checkpoint,
        resume=args.resume,
        progress=not args.no_progress,
        **overrides,
    )
    path = model.save(args.out, overwrite=args.overwrite)
    logger.info("Saved the model (%d genes) to %s", len(model.genes), path)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import dkan

    if args.out_dir is not None:
        status = _many.predict_many(args)
        if status:
            _quiet_exit()  # a slide that failed to decode leaves zarr's pending reads to report at exit
        return status
    store = args.store.resolve()
    if args.out is not None:
        _check_out(store, args.out.resolve(), overwrite=args.overwrite)
    from dkan.tl._slide import default_shared_tiles
    from dkan.tl._slide_errors import slide_stage

    if args.in_place and args.store.exists() and not is_store(args.store):
        raise ValueError(f"`--in-place` needs a zarr store; `{args.store}` is a slide file. Use `--out OUT.zarr`.")
    model = _load_model(args.model)
    if args.in_place:
        recover_store(args.store)
        restore_backups(args.store)
    with slide_stage(args.store, "read", user_errors_as_is=True):
        sdata = read_slide(args.store, um_per_px=args.um_per_px)
    before = {name: id(el) for _, name, el in sdata.gen_elements()}
    args.shared_tiles = int(default_shared_tiles(args.store, args.shared_tiles))  # 2 for a slide file
    with slide_stage(args.store, "predict", user_errors_as_is=True):  # pixels are decoded here (lazily read)
        if args.shared_tiles:
            _shared_tile_features(sdata, model, args)
        tkey = dkan.tl.predict(
            sdata,
            model,
            key_added=args.key_added,
            device=args.device,
            table_key=args.table_key,
            image_key=args.image_key,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            um_per_px=args.um_per_px,
            gene_symbols=args.gene_symbols,
            progress=not args.no_progress,
        )
    if args.out is not None:
        record_source(sdata, args.store, tkey, with_image=args.with_image or None)
        write_new_store(sdata, args.out, overwrite=args.overwrite)
        logger.info("Wrote predictions (table `%s`, layer %r) to %s", tkey, args.key_added, args.out)
    else:
        changed = [name for _, name, el in sdata.gen_elements() if before.get(name) != id(el)]
        update_in_place(sdata, tkey, added=[n for n in changed if n != tkey])
        logger.info("Updated table `%s` (layer %r) in %s", tkey, args.key_added, store)
    return 0


def _shared_tile_features(sdata: SpatialData, model: Any, args: argparse.Namespace) -> None:
    """``--shared-tiles``: pseudo-spots if needed, the model's tiles, then shared-tile features (predict keeps them)."""
    import dkan
    from dkan._data import prepare as prep

    if args.table_key is None and not len(sdata.tables):
        dkan.tl.make_spots(sdata, image_key=args.image_key, um_per_px=args.um_per_px)
    prep.ensure_tiles(sdata, model.config, table_key=args.table_key, image_key=args.image_key)
    dkan.tl.extract_features(
        sdata,
        model.meta["features"]["encoder"],
        table_key=args.table_key,
        device=args.device,
        shared_tiles=int(args.shared_tiles),
        progress=not args.no_progress,
    )


def _check_out(store: Path, out: Path, *, overwrite: bool) -> None:
    if out == store or store in out.parents or out in store.parents:
        raise ValueError(f"`--out {out}` overlaps the input store {store}; use --in-place to update the input store.")
    recover_store(out)
    check_replaceable_store(out, overwrite=overwrite)


# ----------------------------------------------------------------------------------------- errors
def _load_model(path: Path) -> Any:
    """``DKANModel.load(path)``; a folder that cannot be read as a model is one user error naming it."""
    import dkan

    try:
        return dkan.DKANModel.load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # json, safetensors and torch each raise their own type for a bad folder
        raise ValueError(
            f"`--model {path}` could not be loaded ({type(err).__name__}: {error_line(err)}). Point --model at a "
            "folder written by `dkan train` (DKANModel.save), or save the model again."
        ) from err


# ----------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dkan`` command line; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    0 on success; 1 on an expected error (bad input, unreadable or corrupt files, a bad device), reported on
    stderr as one line ``dkan: error: ...`` (``--debug`` re-raises it with its traceback); argparse exits
    with 2 on bad arguments.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "predict":
        _many.check_predict_args(parser, args)
    _setup_logging(args)
    try:
        return int(args.func(args))
    except _USER_ERRORS as err:
        if args.debug:
            raise
        print(f"dkan: error: {error_line(err)}", file=sys.stderr)
        _quiet_exit()
        return 1


def _quiet_exit() -> None:
    """After a reported error, drop the noise zarr's event loop makes at exit about the reads the error cut short.

    A chunk that fails to decode stops zarr's other pending reads; when the interpreter exits, asyncio reports
    each of them ("Task exception was never retrieved", "Event loop is closed"), repeating the error already
    reported on one line. ``--debug`` re-raises before this and keeps everything.
    """
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    sys.unraisablehook = hook


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
