"""The one seam between the map methods and a network: what a method may ask of it.

Two implementations answer it: :class:`mnpo.models.map_source.NetworkSource` for mnpo's own
networks (their named features, truncated forward and in-network ablation) and
:class:`mnpo.models.hooked.HookedSource` for any classifier (forward hooks on its modules).
:func:`feature_source` picks one. Shapes: ``images`` ``(B, 3, H, W)``; logits ``(B, K)``;
activations ``(B, C, h, w)`` (token layers are turned into that grid by the source).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn


class FeatureSource(Protocol):
    """What the map methods ask of a network (see the two implementations)."""

    num_classes: int
    #: branch names, main first (one for a plain classifier)
    branches: tuple[str, ...]
    #: layer of the CAM family when none is given; of ``mnpos`` / ``dgl``
    default_layer: str
    default_gradient_layer: str

    def logits(self, x: Tensor) -> Tensor:
        """Main logits ``(B, K)`` of ``x``, without autograd."""

    def activations(self, images: Tensor, layer: Any) -> tuple[Tensor, Tensor]:
        """``(A (B, C, h, w), main logits)`` at ``layer``, without autograd."""

    def tracked(self, images: Tensor, layer: Any):
        """A forward truncated at ``layer``: ``.leaf`` (requires grad), ``.logits`` (per branch,
        from ``leaf``) and ``.grid`` (leaf-shaped tensor -> ``(B, C, h, w)``)."""

    def head_weight(self, images: Tensor, layer: Any) -> Tensor | None:
        """Classifier weight ``(K, C)`` when GAP and one linear layer turn ``layer`` into the logits."""

    def ablated_logits(self, images: Tensor, layer: Any, copies: Tensor) -> Tensor:
        """Main logits ``(k B, K)`` with ``layer``'s output replaced by ``copies`` ``(k B, C, h, w)``."""

    def ablation_runs_suffix(self, images: Tensor, layer: Any) -> bool:
        """Whether ``ablated_logits`` runs only the network after ``layer`` on the copies (else
        each image's whole network ``k`` times)."""

    def branch_features(self, images: Tensor) -> tuple[Tensor, list[tuple[str, Tensor, Tensor]]]:
        """Main logits and ``(name, pre-GAP features, classifier weight (K, C))`` per branch."""

    def own_cam(self, images: Tensor, targets: Tensor | None, top_k: int | None = None
                ) -> tuple[Tensor, Tensor] | None:
        """A network's own test map ``(B, h, w)`` and logits, or ``None`` (plain CAM applies);
        ``top_k``: BAS's mean over the top-k predicted classes."""


def feature_source(model: nn.Module, images: Tensor, targets: Tensor | None, **options: Any) -> FeatureSource:
    """The seam for ``model``: mnpo's networks answer themselves, any other module through hooks
    (``options``: :class:`~mnpo.models.hooked.HookedSource`'s ``reshape`` and ``classifier``)."""
    from mnpo.models.map_source import NetworkSource, is_mnpo_network

    if is_mnpo_network(model):
        return NetworkSource(model, images, targets)
    from mnpo.models.hooked import HookedSource

    # a classifier wrapped for the engine (mnpo.models.external) is hooked by its own layer names
    source = HookedSource(getattr(model, "wrapped_classifier", model), **options)
    source.prepare(images)
    return source


class SharedPasses:
    """``source`` for several classes of the same images: its passes on those images (activations,
    the truncated forward, branch features, the head check) run once and are reused; the
    truncated graph is kept (``Tracked.shared``) for one backward per class."""

    def __init__(self, source: FeatureSource, images: Tensor) -> None:
        self._source, self._images, self._memo = source, images, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def _once(self, images: Tensor, key: tuple, run):
        if images is not self._images:
            return run()
        key = tuple(id(k) if isinstance(k, nn.Module) else k for k in key)
        if key not in self._memo:
            self._memo[key] = run()
        return self._memo[key]

    def activations(self, images: Tensor, layer: Any) -> tuple[Tensor, Tensor]:
        return self._once(images, ("activations", layer), lambda: self._source.activations(images, layer))

    def tracked(self, images: Tensor, layer: Any):
        def run():
            tracked = self._source.tracked(images, layer)
            tracked.shared = True
            return tracked
        return self._once(images, ("tracked", layer), run)

    def branch_features(self, images: Tensor):
        return self._once(images, ("branches",), lambda: self._source.branch_features(images))

    def head_weight(self, images: Tensor, layer: Any) -> Tensor | None:
        return self._once(images, ("head", layer), lambda: self._source.head_weight(images, layer))
