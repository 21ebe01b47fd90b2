"""The argument parser of the ``dkan`` command line (:mod:`dkan.cli` runs the commands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dkan import _keys as K

#: A subcommand: parsed arguments -> exit status.
Command = Callable[[argparse.Namespace], int]


def build_parser(*, train: Command, predict: Command) -> argparse.ArgumentParser:
    """The ``dkan`` argument parser with its ``train`` and ``predict`` sub-commands."""
    parser = argparse.ArgumentParser(
        prog="dkan",
        description="Train DKAN on SpatialData zarr stores of paired H&E and spot expression, and predict "
        "spatial expression for new H&E slides.",
    )
    from dkan._version import __version__

    parser.add_argument("--version", action="version", version=f"dkan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,predict}")
    _add_train(sub, train)
    _add_predict(sub, predict)
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


def _add_train(sub: Any, command: Command) -> None:
    from dkan._config import PRESETS, DKANConfig

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
    p.set_defaults(func=command)


def _add_predict(sub: Any, command: Command) -> None:
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
    p.add_argument(
        "store",
        type=Path,
        nargs="+",
        metavar="STORE",
        help="Input SpatialData zarr store or whole-slide file (SLIDE); several need --out-dir.",
    )
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
    where.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="Predict each input into its own new store DIR/NAME.zarr (dkan.tl.predict_slides); stores already "
        "there are skipped (unless --overwrite), a slide that fails is reported and the others go on. Prints "
        "one line per slide (slide, status, error); exit status 1 if any slide failed.",
    )
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
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="With --out-dir: run one slide per task on the Dask cluster at ADDRESS (e.g. tcp://host:8786; "
        "workers must see the inputs, DIR and the model folder). Default: one slide after the other here.",
    )
    p.add_argument(
        "--errors",
        choices=("skip", "raise"),
        default="skip",
        help="With --out-dir: 'skip' (default) reports a failed slide and goes on; 'raise' stops at the first.",
    )
    _add_common(p)
    p.set_defaults(func=command)
