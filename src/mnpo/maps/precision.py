"""Where float32 gradient maps part from float64 ones: the network's ReLU and max-pool decisions.

A gradient map (``mnpos``, ``dgl``, the CAM family) reads ``J^T v`` at a target layer, and the
Jacobian ``J`` of a ReLU network is piecewise constant: each ReLU after the target passes its
unit's gradient when the pre-activation is positive and blocks it otherwise; each max-pool
passes it to the largest input of its window. The pre-activations themselves carry the
rounding of every layer before them (about 2e-6 of their size in float32 on the released VGG16
at ``conv5_2``, 1e-15 in float64). A unit whose pre-activation lies that close to 0 (or a pool
window whose two largest inputs lie that close) is decided one way in float32 and the other in
float64. Both are roundings of the same real number; neither is wrong, but the gradient jumps:
one unit of ``d`` (the parallel branch's 1x1 reduction) decided the other way moves that
branch's gradient at ``conv5_2`` by 1.5e-2 of its norm, and the normalized MNPOs map by up to
2.8e-3 near the unit (BENCHMARKS.md, "Float32 maps"). That is the method's own sensitivity,
not lost digits: with the same decisions, float32 and float64 maps agree to rounding.

``Decisions`` makes that checkable. Recording, it keeps the decision of every ReLU and of every
max-pool that autograd records, in call order; replaying, it imposes them on a second run of
the same computation (another dtype, another kernel path) and lists where that run would have
decided otherwise, with the margin it would have decided by::

    with Decisions() as recorded:
        maps32, _ = compute_maps(model, images, targets, method="mnpos")
    with Decisions(replay=recorded.decisions) as replayed:
        maps64, _ = compute_maps(model.double(), images.double(), targets, method="mnpos")
    replayed.disagreements   # [Disagreement(op, call, row, units, margin, scale), ...]

Replayed, a ReLU gives ``|x|`` where the recorded decision passes and ``0`` where it blocks (so
``relu(x)`` wherever the two runs agree, and autograd's backward follows the recorded mask); a
max-pool gives the input at the recorded index. The tool works below autograd (a
``TorchDispatchMode``); the networks are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_RELUS = (aten.relu.default, aten.relu_.default)
_MAX_POOL = aten.max_pool2d_with_indices.default


@dataclass(frozen=True)
class Disagreement:
    """Units a replayed run would have decided otherwise, in one row of one call.

    op: ``relu`` or ``max_pool2d``. call: the op's index in the run's sequence of decisions.
    row: the batch row. units: how many of that row's units. margin: the largest margin the
    replayed run would have decided by (a ReLU's ``|x|``; a pool window's gap between its
    maximum and the recorded input), in the tensor's units. scale: ``max |x|`` of that row's
    input to the op, so that ``margin / scale`` is the relative size of the disagreement.
    """

    op: str
    call: int
    row: int
    units: int
    margin: float
    scale: float


class Decisions(TorchDispatchMode):
    """Record (``replay=None``) or impose (``replay=``: a recorded ``decisions`` list) the ReLU
    signs and autograd-recorded max-pool indices of a computation; see the module's docstring.

    decisions: per op call, a ReLU's ``x > 0`` (bool, the input's shape) or a pool's indices.
    disagreements: when replaying, the rows where the run's own decision differed.
    """

    def __init__(self, replay: list[Tensor] | None = None) -> None:
        super().__init__()
        self.replay = replay
        self.decisions: list[Tensor] = []
        self.disagreements: list[Disagreement] = []

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if exc[0] is None and self.replay is not None and len(self.decisions) != len(self.replay):
            raise ValueError(f"replay: the run took {len(self.decisions)} decisions, the recording has "
                             f"{len(self.replay)}: not the same computation")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return self._relu(func, args[0])
        if func is _MAX_POOL:
            return self._max_pool(func, args, kwargs)
        return func(*args, **kwargs)

    def _recorded(self, op: str, like: Tensor) -> Tensor:
        call = len(self.decisions)
        if call >= len(self.replay):
            raise ValueError(f"replay: {op} call {call} has no recorded decision (the recording has "
                             f"{len(self.replay)}): not the same computation")
        recorded = self.replay[call].to(like.device)
        if recorded.shape != like.shape:
            raise ValueError(f"replay: {op} call {call} has shape {tuple(like.shape)}, the recorded "
                             f"decision {tuple(recorded.shape)}: not the same computation")
        return recorded

    def _note(self, op: str, differs: Tensor, margins: Tensor, x: Tensor) -> None:
        call = len(self.decisions)
        rows = differs.flatten(1).any(1).nonzero().flatten().tolist()
        for row in rows:
            mask = differs[row]
            self.disagreements.append(Disagreement(op, call, row, int(mask.sum()), float(margins[row][mask].max()),
                                                   float(x[row].abs().max())))

    def _relu(self, func, x: Tensor) -> Tensor:
        own = x > 0
        if self.replay is None:
            self.decisions.append(own)
            return func(x)
        passes = self._recorded("relu", x)
        if (differs := passes != own).any():
            self._note("relu", differs, x.abs(), x)
        self.decisions.append(passes)
        out = torch.where(passes, x.abs(), torch.zeros_like(x))
        if func is aten.relu_.default:
            return x.copy_(out)
        return out

    def _max_pool(self, func, args, kwargs):
        out, indices = func(*args, **kwargs)
        if self.replay is None:
            self.decisions.append(indices)
            return out, indices
        x = args[0]
        recorded = self._recorded("max_pool2d", indices)
        taken = x.flatten(-2).gather(-1, recorded.flatten(-2)).view_as(out)
        if (differs := recorded != indices).any():
            self._note("max_pool2d", differs, out - taken, x)
        self.decisions.append(recorded)
        return taken, recorded
