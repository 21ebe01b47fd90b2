"""Pixel operations on crops: flips and 90° rotations, antialiased resizing, cutting a region into its tiles."""

from __future__ import annotations

import numpy as np


def augment(arr: np.ndarray, hflip: bool, vflip: bool, rot: int) -> np.ndarray:
    """Flip the last (x) axis, the second last (y) axis, then rotate by ``rot`` x 90° (``np.rot90`` on y, x)."""
    if hflip:
        arr = arr[..., ::-1]
    if vflip:
        arr = arr[..., ::-1, :]
    return np.rot90(arr, rot, axes=(-2, -1)) if rot else arr


def augment_tiles(tiles: np.ndarray, hflip: bool, vflip: bool, rot: int) -> np.ndarray:
    """:func:`augment` of a region window given as its ``(G, G, c, P, P)`` tiles: move tiles and their pixels."""
    t = augment(tiles, hflip, vflip, rot)
    return augment(t.transpose(2, 3, 4, 0, 1), hflip, vflip, rot).transpose(3, 4, 0, 1, 2)


def resize(arr: np.ndarray, side: int) -> np.ndarray:
    """Resize a uint8 ``(c, h, w)`` window to ``(c, side, side)`` (antialiased bilinear)."""
    if arr.shape[1] == side and arr.shape[2] == side:
        return arr
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr)).float()[None]
    t = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return t[0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def cut_tiles(window: np.ndarray, out: np.ndarray, grid: int) -> None:
    """Cut a ``(c, G*P, G*P)`` window row-major into ``out`` of shape ``(G*G, c, P, P)`` (one strided copy)."""
    c, side = window.shape[0], window.shape[1] // grid
    out.reshape(grid, grid, c, side, side)[...] = window.reshape(c, grid, side, grid, side).transpose(1, 3, 0, 2, 4)
