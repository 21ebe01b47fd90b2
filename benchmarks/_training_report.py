"""Helpers of the training benchmark: device description, command-line parsing and the markdown table."""

from __future__ import annotations

import os
import platform
import statistics

from _machine import cpu_model


def device_name(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = cpu_model(platform.processor() or "CPU")
    return f"{model}, {os.cpu_count()} logical cores, torch threads {threads or torch.get_num_threads()}"


def table(rows: list[dict], device: str) -> str:
    """Markdown table of all cells with the reference/ours ratios."""
    mem = "peak GPU alloc" if device.startswith("cuda") else "peak RSS"
    out = [
        f"| preset | batch | strategy | steps/epoch | mean batch | slide-encoder runs (spots)/epoch | s/epoch (median) "
        f"| {mem} GiB (Δ setup) | ref/ours time | ours/ref memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["preset"], r["batch"], r["strategy"]): r for r in rows}
    for r in rows:
        res, cell = r["result"], (r["preset"], r["batch"], r["strategy"])
        if "error" in res:
            out.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {res['error']} | | | | | | |")
            continue
        med = statistics.median(res["times"])
        spread = f"{med:.2f}" + (f" ({min(res['times']):.2f}-{max(res['times']):.2f})" if len(res["times"]) > 1 else "")
        spread += " extrap." if res["extrapolated"] else ""
        speed = mratio = ""
        other = by.get((cell[0], cell[1], "reference"), {}).get("result", {})
        if cell[2] == "ours" and "times" in other:
            speed = f"{statistics.median(other['times']) / med:.2f}x"
            d_ours, d_ref = res["peak_gib"] - res["setup_gib"], other["peak_gib"] - other["setup_gib"]
            mratio = f"{res['peak_gib'] / other['peak_gib']:.2f} (Δ {d_ours / max(d_ref, 1e-9):.2f})"
        out.append(
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {res['steps']} | {res['mean_batch']:.0f} "
            f"| {res['slide_runs']:.0f} ({res['slide_spots']:.0f}) | {spread} "
            f"| {res['peak_gib']:.2f} ({res['peak_gib'] - res['setup_gib']:+.2f}) | {speed} | {mratio} |"
        )
    return "\n".join(out)


def parse_spots(text: str) -> tuple[int, ...]:
    """``"600*30"`` -> 30 sections of 600 spots; ``"170,180"`` -> two sections."""
    if "*" in text:
        n, k = text.split("*")
        return (int(n),) * int(k)
    return tuple(int(x) for x in text.split(","))


def parse_cells(text: str, epochs: int) -> list[tuple[str, int, int]]:
    """``"small:32,small:128:1"`` -> [(preset, batch, epochs)]."""
    cells = []
    for part in filter(None, text.split(",")):
        bits = part.split(":")
        if len(bits) not in (2, 3):
            raise ValueError(f"Expected `--cells` items 'preset:batch[:epochs]', found {part!r}.")
        cells.append((bits[0], int(bits[1]), int(bits[2]) if len(bits) == 3 else epochs))
    return cells
