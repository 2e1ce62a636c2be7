"""Localization maps: CAM, MNPO, MNPOs, Grad-CAM and DGL through ``compute_maps``."""

from mnpo.maps.methods import METHODS, MapOptions, compute_maps
from mnpo.maps.postprocess import (
    channel_weighted_mean,
    fuse_maps,
    normalize_maps,
    resize_maps,
    weight_postprocess,
)

__all__ = [
    "METHODS", "MapOptions", "channel_weighted_mean", "compute_maps", "fuse_maps", "normalize_maps",
    "resize_maps", "weight_postprocess",
]
