"""Command line: ``dkan train`` and ``dkan predict`` on SpatialData zarr stores (thin wrappers of ``dkan.tl``).

Examples
--------
.. code-block:: bash

    dkan train slides.zarr --out model/ --config her2st --set max_epochs=50 --descriptions genes.tsv
    dkan predict new_slide.zarr --model model/ --out new_slide_pred.zarr
    dkan predict new_slide.zarr --model model/ --in-place

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
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan import _keys as K
from dkan.io._store_write import (
    backup_path,
    check_replaceable_store,
    recover_store,
    restore_backups,
    write_backup,
    write_new_store,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: Exceptions that are user errors: reported as one line ``dkan: error: ...`` (``--debug`` shows the traceback).
#: OSError covers files and folders that cannot be read or written (missing, no permission, not decodable).
_USER_ERRORS = (KeyError, ValueError, TypeError, FileNotFoundError, FileExistsError, OSError)


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``dkan`` argument parser with its ``train`` and ``predict`` sub-commands."""
    parser = argparse.ArgumentParser(
        prog="dkan",
        description="Train DKAN on SpatialData zarr stores of paired H&E and spot expression, and predict "
        "spatial expression for new H&E slides.",
    )
    from dkan import __version__

    parser.add_argument("--version", action="version", version=f"dkan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,predict}")
    _add_train(sub)
    _add_predict(sub)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table-key", default=None, help="Table annotating the spots (default: the store's only table).")
    p.add_argument(
        "--image-key",
        default=None,
        help="Image element to crop spots from (default: per sample, the highest-resolution image that shares a "
        "coordinate system with the spots). Only for a store with one sample.",
    )
    p.add_argument(
        "--device", default=None, help="Torch device, e.g. 'cuda', 'cuda:1', 'cpu' (default: CUDA if available)."
    )
    p.add_argument(
        "--gene-symbols",
        default=None,
        metavar="COLUMN",
        help="Table var column of gene symbols, when var_names are other ids (e.g. Ensembl ids of a Visium table).",
    )
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    p.add_argument("-q", "--quiet", action="store_true", help="Log warnings and errors only.")
    p.add_argument(
        "--debug",
        action="store_true",
        help="Debug logging (with the messages of tifffile), and full tracebacks on errors.",
    )


def _add_train(sub: Any) -> None:
    from dkan.train.config import PRESETS, DKANConfig

    p = sub.add_parser(
        "train",
        help="Train a model on a SpatialData zarr store and save it to a folder.",
        description="Train DKAN on every sample of a SpatialData zarr store (H&E image + spot circles + a table of "
        "raw counts). Steps not yet run on the store (gene panel, normalisation, tiling, frozen features, gene "
        "embeddings) run in memory with the configuration's settings; the input store is not modified.",
        epilog="Configuration fields for --set (documented in dkan.DKANConfig): "
        f"{', '.join(DKANConfig.field_names())}.",
    )
    p.add_argument("store", type=Path, help="Input SpatialData zarr store (read with spatialdata.read_zarr).")
    p.add_argument("--out", required=True, type=Path, help="Folder to save the trained model to (DKANModel.save).")
    p.add_argument(
        "--config",
        default=None,
        help=f"Preset name ({', '.join(sorted(PRESETS))}; default {DKANConfig.DEFAULT_PRESET}) or a JSON file "
        'with a mapping of configuration fields, optionally naming its base preset as {"preset": "her2st", ...}.',
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one configuration field; repeatable. VALUE is read as JSON when it parses "
        "(5, 0.001, true, null, [1, 2]) and as a string otherwise (efficientnet_lite0).",
    )
    p.add_argument(
        "--descriptions",
        default=None,
        help="Gene descriptions for the text embeddings: a TSV of {symbol, text} (e.g. NCBI RefSeq summaries) or "
        "'ncbi' to fetch them online (cached). Default: gene symbols only, with a warning.",
    )
    p.add_argument(
        "--gene-info",
        type=Path,
        default=None,
        help="NCBI gene_info file (e.g. Homo_sapiens.gene_info.gz): genes without a description get their full "
        "name, and symbols missing from --descriptions are looked up under their official symbol.",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="File for a resumable checkpoint written every epoch.")
    p.add_argument("--resume", action="store_true", help="Continue from --checkpoint when it exists.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing model folder at --out.")
    _add_common(p)
    p.set_defaults(func=_train)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="Predict expression on a SpatialData zarr store or a whole-slide file with a saved model.",
        description="Predict the model's gene panel at every spot of a SpatialData zarr store, or of a whole-slide "
        "file (.svs, .tif/OME-TIFF, .ndpi, .scn; read lazily with its pixel size through dkan.io.read_wsi). With a "
        "table of spots TABLE, predictions go to layers[KEY_ADDED] of its panel-sized results table TABLE_dkan (var = "
        "the model's gene panel; the count table is left as it was); on an H&E-only slide, tissue is detected on a "
        "low pyramid level and pseudo-spots and a new panel-sized table over them are created. "
        "Missing tiles and frozen features are computed with the model's settings.",
        epilog="--out writes a new store (to a temporary sibling path, renamed into place when complete). "
        "--in-place rewrites the results table element of STORE (and adds any new element): the updated table is first "
        "backed up next to the store as .STORE.TABLE.dkan-backup.zarr, removed again on success.",
    )
    p.add_argument("store", type=Path, help="Input SpatialData zarr store or whole-slide file (SLIDE).")
    p.add_argument("--model", required=True, type=Path, help="Model folder written by `dkan train` / DKANModel.save.")
    p.add_argument(
        "--um-per-px",
        type=float,
        default=None,
        help="Pixel size (µm/px) of the full-resolution image, for a slide or H&E-only store that does not record "
        "one (default: the slide's metadata).",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, default=None, help="Write the store with predictions to this new path.")
    where.add_argument("--in-place", action="store_true", help="Update STORE itself (see below; not for a slide file).")
    p.add_argument(
        "--with-image",
        action="store_true",
        help="Copy the slide's image into the --out store (default for a slide file: left out, its path recorded; "
        "dkan.io.add_slide_image adds it back). Stores keep their images.",
    )
    p.add_argument("--key-added", default=K.PRED, help=f"layers key of the predictions (default {K.PRED!r}).")
    p.add_argument("--batch-size", type=int, default=256, help="Spots per forward pass (default 256).")
    p.add_argument(
        "--shared-tiles",
        nargs="?",
        type=int,
        const=1,
        default=None,
        metavar="N",
        help="Compute region features once per tile of a slide-aligned grid and share them between neighbouring "
        "spots (dkan.tl.extract_features(shared_tiles=True)): encoder passes grow with the tissue area instead of "
        "26 per spot, much faster on whole slides. A departure from the reference (spot-centred region tiles), "
        "recorded in the features' provenance. "
        "N > 1 puts the grid tiles 1/N of a tile apart (closer to spot-centred tiles, about N^2 times the tiles); "
        "0: spot by spot. Default: 2 for a slide file (within 0.001 PCC-ALL of spot by spot on her2st, 8x fewer "
        "encoder passes on whole slides), spot by spot for a zarr store.",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace existing predictions under --key-added, and an existing store at --out.",
    )
    _add_common(p)
    p.set_defaults(func=_predict)


# ----------------------------------------------------------------------------------------- helpers
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

    from dkan.train.config import DKANConfig

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


def _read(store: Path) -> SpatialData:
    import spatialdata as sd

    if not store.exists():
        raise FileNotFoundError(f"Store `{store}` does not exist.")
    logger.info("Reading %s", store)
    try:
        return sd.read_zarr(store)
    except Exception as err:  # zarr, anndata and spatialdata raise many types for a folder that is no store
        raise ValueError(
            f"Store `{store}` cannot be read as a SpatialData zarr store ({type(err).__name__}: {error_line(err)}). "
            "Pass a store written by `SpatialData.write`."
        ) from err


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
    sdata = _read(args.store)
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

    store = args.store.resolve()
    if args.out is not None:
        _check_out(store, args.out.resolve(), overwrite=args.overwrite)
    from dkan.tl._slide_errors import slide_stage
    from dkan.tl._slides import default_shared_tiles, is_store, read_slide, record_source

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
    from dkan.tl import _prepare as prep

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


def update_in_place(sdata: SpatialData, table_key: str, *, added: Sequence[str] = ()) -> None:
    """Rewrite table ``table_key`` of a backed SpatialData on disk and write the new elements ``added``.

    The updated table is first saved as a one-table store next to the store (``.STORE.TABLE.dkan-backup.zarr``,
    renamed into place once complete) so an interruption between deleting and rewriting the element loses
    nothing; the backup is removed when the element is written. A killed or failed update leaves the backup,
    and the next in-place run finishes the update from it before reading the store.

    Parameters
    ----------
    sdata
        A SpatialData read from a zarr store (``sdata.path`` set).
    table_key
        The table to replace on disk with its in-memory version.
    added
        Names of elements that are new in memory and not yet on disk.
    """
    if sdata.path is None:
        raise ValueError("The SpatialData is not backed by a zarr store; write it with `sdata.write(path)` instead.")
    store = Path(sdata.path)
    # public API: paths are "<element type>/<element name>"
    on_disk = {p.rsplit("/", 1)[-1] for p in sdata.elements_paths_on_disk()}
    for name in added:
        if name not in on_disk:
            sdata.write_element(name)
    if table_key not in on_disk:
        sdata.write_element(table_key)
        return
    backup = backup_path(store, table_key)
    write_backup(sdata.tables[table_key], table_key, backup)
    try:
        sdata.delete_element_from_disk(table_key)
        sdata.write_element(table_key)
    except BaseException:
        logger.error(
            "Rewriting table `%s` in %s failed; the updated table is kept in %s. The next `dkan predict "
            "--in-place` on the store restores it (dkan.io._store_write.restore_backups).",
            table_key, store, backup,
        )  # fmt: skip
        raise
    shutil.rmtree(backup, ignore_errors=True)


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


def error_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a KeyError's message without the quotes ``str`` adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(str(msg).split())
    return text or type(err).__name__


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
