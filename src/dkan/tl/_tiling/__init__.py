"""Tiling: spot geometry, crop reading, pseudo-spots, image checks, shared tiles."""
