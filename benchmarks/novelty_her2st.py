"""Novelty flag on unfamiliar input (issue 23): a her2st model against its own patient, stain shifts, a blank
slide and the mouse olfactory bulb.

A ``small``-preset model is trained on her2st sections ``--train`` (default C2, C3). It then predicts

* ``--test`` (default C4, C5, C6): held-out serial sections of the same patient (should be familiar: few novel
  spots);
* the first of them colour-shifted: each ``--shift`` added to the R, G, B channels (default +70, -50, +40, the
  milder +35, -25, +20 and -40, +30, -60; clipped to 0-255), a stand-in for another stain or scanner;
* the same section blank: every pixel white (255), tissue gone;
* the mouse olfactory bulb ST sections ``--mob`` (default MOB1, MOB2) from ``stutility_mob/`` (another species
  and tissue; their counts are zeroed because no mouse gene id is in the panel: the image alone is scored),

and prints, for each, the share of spots flagged novel (``obs["dkan_novel"]``), by the frozen features
(``obs["dkan_novelty"]`` above the model's threshold, the 99th percentile of the training spots' own
leave-one-out novelty) and by the colour (``obs["dkan_colour_novelty"]`` above 1: the Mahalanobis distance of the
patch's optical-density channel shares over the 99th percentile of the training spots' own; docs/method.md), and
the median of each novelty over its threshold. Only patient C of her2st has images here, so no other patient (stain
batch) can be scored.

Usage::

    python benchmarks/novelty_her2st.py                       # her2st + mouse bulb from ../shared/data
    python benchmarks/novelty_her2st.py --toy                 # toy slides, seconds: checks the code paths only

Options: ``--data DIR`` (holds ``her2st/`` and ``stutility_mob/``; default ``$DKAN_DATA_DIR`` or
``../shared/data``), ``--max-epochs`` (default 3), ``--n-genes`` (default 50), ``--out FILE`` (markdown).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DKAN_DATA_DIR", ROOT.parent / "shared" / "data"))
log = logging.getLogger("dkan.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--train", default="C2,C3", help="her2st sections the model is trained on")
    p.add_argument("--test", default="C4,C5,C6", help="held-out her2st sections (the first: base of shifted/blank)")
    p.add_argument("--mob", default="MOB1,MOB2", help="mouse olfactory bulb sections of stutility_mob/ ('' : none)")
    shifts = "70,-50,40;35,-25,20;-40,30,-60"
    p.add_argument("--shift", default=shifts, help="R,G,B shifts of the first --test, ';'-separated (--shift=...)")
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument("--toy", action="store_true", help="toy slides instead of real data (checks the code paths)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    return p.parse_args(argv)


def recolour(sdata: Any, fn: Any) -> Any:
    """``sdata`` with every image replaced by ``fn(uint8 array (c, y, x))`` clipped to 0-255 (same transforms)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    for key in list(sdata.images):
        old = sdata.images[key]
        base = old["scale0"].image if hasattr(old, "children") else old
        data = np.clip(fn(np.asarray(base.values)), 0, 255).astype(np.uint8)
        scales = [2] * (len(old.children) - 1) if hasattr(old, "children") else None
        sdata.images[key] = Image2DModel.parse(
            data, dims=("c", "y", "x"), scale_factors=scales, transformations=get_transformation(base, get_all=True)
        )
    return sdata


def inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Training data, the inputs to score (name -> zero-argument loader) and training overrides."""
    import dkan

    shifts = {t: np.array([float(v) for v in t.split(",")])[:, None, None] for t in args.shift.split(";") if t}
    if any(v.shape[0] != 3 for v in shifts.values()):
        raise SystemExit(f"--shift needs three comma-separated values (R,G,B) each, found {args.shift!r}.")
    if args.toy:
        from dkan.datasets import copy_sdata
        from dkan.demo import split_toy

        train, held = split_toy()
        tests = {"toy held-out slide": lambda: copy_sdata(held)}
        overrides = {"feature_encoder": "dummy", "n_genes": min(args.n_genes, 30)}
    else:
        her2st = args.data / "her2st"
        if not (her2st / "ST-cnts").is_dir():
            raise SystemExit(f"No her2st data at {her2st}; pass --data (the folder holding her2st/, stutility_mob/).")
        train = dkan.datasets.her2st(her2st, sections=args.train.split(","), progress=False)
        tests = {
            f"her2st {name} (held out, same patient)": lambda name=name: dkan.datasets.her2st(
                her2st, sections=[name], progress=False
            )
            for name in args.test.split(",")
        }
        overrides = {"n_genes": args.n_genes}
    cases: dict[str, Any] = dict(tests)
    label, test = next(iter(tests.items()))
    for text, shift in shifts.items():
        cases[f"{label}, colour shift {text} (R,G,B)"] = lambda s=shift: recolour(test(), lambda a: a.astype(int) + s)
    cases[f"{label}, blank (white)"] = lambda: recolour(test(), lambda a: np.full_like(a, 255))
    for name in [m for m in args.mob.split(",") if m] if not args.toy else []:
        cases[f"mouse olfactory bulb {name}"] = lambda name=name: mouse_section(args.data / "stutility_mob", name)
    return train, cases, overrides


def mouse_section(folder: Path, name: str) -> Any:
    """One ST section of the mouse olfactory bulb, counts zeroed (no mouse gene id is in a her2st panel)."""
    import dkan
    from dkan import _keys as K

    if not (folder / f"{name}.tsv").is_file():
        raise SystemExit(f"No {name}.tsv in {folder}; pass --data or --mob ''.")
    sdata = dkan.io.read_st(
        folder / f"{name}.tsv", folder / f"alignment_table_{name}.tsv", folder / f"{name}.jpg", sample_id=name
    )
    table = sdata.tables[K.TABLE]
    table.X = np.zeros(table.shape, dtype=np.float32)
    return sdata


def novel_fraction(sdata: Any, model: Any) -> tuple[int, float, float, float, float, float]:
    """Spots, shares flagged (either signal, features, colour) and median novelty / threshold (features, colour)."""
    import dkan
    from dkan import _keys as K

    obs = sdata.tables[dkan.tl.predict(sdata, model, progress=False)].obs
    thr = float(model.meta[K.UNS_TRUST]["novelty"]["threshold"])
    feat = obs[K.NOVELTY].to_numpy(dtype=float)
    col = obs[K.COLOUR_NOVELTY].to_numpy(dtype=float) if K.COLOUR_NOVELTY in obs else np.full(len(obs), np.nan)
    by_colour = float((col > 1).mean()) if np.isfinite(col).any() else float("nan")
    return (
        len(obs), float(obs[K.NOVEL].mean()), float((feat > thr).mean()), by_colour,
        float(np.nanmedian(feat) / thr), float(np.median(col)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[tuple[Any, ...]]:
    import dkan

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    train, cases, overrides = inputs(args)
    model = dkan.tl.train(train, config="small", progress=False, max_epochs=args.max_epochs, **overrides)
    times = {"training (inputs included)": time.perf_counter() - t0}
    rows = []
    for name, load in cases.items():
        t = time.perf_counter()
        rows.append((name, *novel_fraction(load(), model)))
        times[name] = time.perf_counter() - t
    lines = [
        "| input | spots | flagged novel (either) | by features | by colour | median feature novelty / threshold "
        "| median colour novelty / threshold |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {k} | {f:.1%} | {ff:.1%} | {fc:.1%} | {m:.2f} | {mc:.2f} |" for n, k, f, ff, fc, m, mc in rows],
        "",
        f"Model: `small` preset, trained on {'toy slides' if args.toy else 'her2st ' + args.train}, "
        f"{args.max_epochs} epoch(s) at most, {len(model.genes)} genes. Times: "
        + "; ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"; total {time.perf_counter() - t0:.0f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Novelty of unfamiliar input (issue 23)\n\n" + text + "\n")
    return rows


if __name__ == "__main__":
    main()
