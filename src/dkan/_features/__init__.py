"""Features: spot and region geometry (tiling), crop reading, pseudo-spots, image checks, frozen image features."""
