"""Every network by its layout: ``MultiBranchNet`` for a ``NetworkLayout`` (CAM, MNPO), the
method networks for a ``MethodLayout`` (ACoL, SPG, BAS, BGC, TS-CAM, SAT), and the names of all shipped layouts."""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from mnpo.models.acol import AcolNet
from mnpo.models.bas import BasNet
from mnpo.models.bgc import BgcNet
from mnpo.models.backbones import BACKBONE_NAMES
from mnpo.models.method_nets import METHOD_NETWORKS, NETWORK_BACKBONES, MethodLayout
from mnpo.models.multibranch import LAYOUTS as MULTIBRANCH_LAYOUTS
from mnpo.models.multibranch import MultiBranchNet, NetworkLayout
from mnpo.models.spg import SpgNet
from mnpo.models.sat import SatNet
from mnpo.models.tscam import TsCamNet

#: ``<backbone>-acol``, ``-spg``, ``-bas`` and ``-bgc`` for each backbone they are
#: built on, ``deit_{tiny,small,base}-tscam`` and ``-sat``: ``(width) -> MethodLayout``.
METHOD_LAYOUTS: dict[str, Callable[[float], MethodLayout]] = {
    f"{backbone}-{network}": partial(lambda n, b, width=1.0: MethodLayout(n, b, width), network, backbone)
    for network in METHOD_NETWORKS for backbone in NETWORK_BACKBONES.get(network, BACKBONE_NAMES)
}
#: Every shipped layout by name: ``(width) -> layout``.
LAYOUTS: dict[str, Callable[..., NetworkLayout | MethodLayout]] = {**MULTIBRANCH_LAYOUTS, **METHOD_LAYOUTS}


def build_network(layout: NetworkLayout | MethodLayout, num_classes: int) -> nn.Module:
    """The (randomly initialized) network a layout describes."""
    if isinstance(layout, MethodLayout):
        return {"acol": AcolNet, "spg": SpgNet, "bas": BasNet, "bgc": BgcNet,
                "tscam": TsCamNet, "sat": SatNet}[layout.network](layout, num_classes)
    return MultiBranchNet(layout, num_classes)
