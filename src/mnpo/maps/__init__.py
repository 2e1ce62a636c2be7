"""Localization maps through ``compute_maps``: CAM, MNPO, MNPOs, DGL and the post-hoc CAM family
(Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Ablation-CAM, Eigen-CAM)."""

from mnpo.maps.methods import METHODS, MapOptions, center_map, compute_maps
from mnpo.maps.postprocess import (
    NORMALIZATIONS,
    channel_weighted_mean,
    fuse_maps,
    normalize_maps,
    resize_maps,
    weight_postprocess,
)

__all__ = [
    "METHODS", "NORMALIZATIONS", "MapOptions", "center_map", "channel_weighted_mean", "compute_maps", "fuse_maps", "normalize_maps",
    "resize_maps", "weight_postprocess",
]
