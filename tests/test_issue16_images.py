"""Issue 16 (and 13, item 5): blank images, upsampled crops and the choice among several images are reported."""

import logging

import numpy as np
from conftest import data_path

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata


def _blank_copy(sdata, key, *, rgba: bool = False):
    """Add a blank (all-zero) image ``key`` in the coordinate systems of the toy's s0 image, at 2x its resolution."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    from dkan._features.levels import image_levels

    src = image_levels(sdata.images[f"s0{K.IMAGE_SUFFIX}"])[0]
    tfs = get_transformation(src, get_all=True)
    half = Scale([0.5, 0.5], axes=("y", "x"))
    c = 4 if rgba else 3
    data = np.zeros((c, 2 * src.sizes["y"], 2 * src.sizes["x"]), dtype=np.uint8)
    sdata.images[key] = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b", "a"] if rgba else None,
        transformations={cs: Sequence([half, t]) for cs, t in tfs.items()},
    )
    return sdata


def test_blank_image_is_reported_with_the_other_images_and_the_choice_logged(toy_master, caplog):
    sdata = _blank_copy(copy_sdata(toy_master), "blank", rgba=True)
    with caplog.at_level(logging.INFO, logger="dkan"):
        dkan.tl.tile(sdata, spots_key=f"s0{K.SPOTS_SUFFIX}", patch_size=32)
    text = caplog.text
    assert "cropping spots from image `blank`" in text  # the highest-resolution image is picked, and said so
    assert "blank around the spots" in text and f"s0{K.IMAGE_SUFFIX}" in text.split("blank around the spots")[1]


def test_textured_image_gives_no_blank_warning(toy_master, caplog):
    sdata = copy_sdata(toy_master)
    with caplog.at_level(logging.INFO, logger="dkan"):
        dkan.tl.tile(sdata, patch_size=32)
    assert "blank" not in caplog.text and "upsampled" not in caplog.text
    assert "cropping spots from image" not in caplog.text  # one image per sample: nothing to choose


def test_upsampling_beyond_the_limit_names_the_fix(caplog):
    sdata = dkan.datasets.toy(n_samples=1, um_per_px=6.0)
    with caplog.at_level(logging.WARNING, logger="dkan"):
        dkan.tl.tile(sdata, patch_size=64, target_mpp=2.0)
    assert "upsampled 3.0x" in caplog.text and "fullres_image_file" in caplog.text and "target_mpp=6" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dkan"):
        dkan.tl.tile(sdata, patch_size=64, target_mpp=4.5)  # 1.33x: within the limit
    assert "upsampled" not in caplog.text


def test_visium_blank_hires_and_upsampled_lowres_images_are_reported(caplog):
    import spatialdata_io

    path = data_path("visium_tiny")  # skips when the shared data is absent

    sd = spatialdata_io.visium(path, dataset_id="tiny")
    with caplog.at_level(logging.INFO, logger="dkan"):
        dkan.tl.tile(sd, patch_size=32)
    assert "cropping spots from image `tiny_hires_image`" in caplog.text
    assert "blank around the spots" in caplog.text and "tiny_lowres_image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dkan"):  # issue 13: only a downscaled image, a 2 µm/px model
        dkan.tl.tile(sd, image_key="tiny_lowres_image", patch_size=32, target_mpp=2.0)
    assert "upsampled" in caplog.text and "fullres_image_file" in caplog.text
