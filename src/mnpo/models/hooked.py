"""Any PyTorch classifier seen through the map methods' seam (:class:`mnpo.maps.source.FeatureSource`).

``HookedSource(model)`` answers the map methods for a module whose forward maps images
``(B, 3, H, W)`` to class scores: a tensor ``(B, K)``, an object with ``.logits`` (Hugging Face),
a dict with ``"logits"``, or a tuple / list whose first element is the scores
(:func:`scores_of`). It reads a layer's output with a forward hook that is removed when the
pass ends, whatever happens in it.

Layers: a dotted module name (``"layer4"``, ``"features.29"``,
``"encoder.layers.encoder_layer_11.ln_1"``), the module itself, or ``"auto"`` / ``"head"``: the
last module, in the order modules finish, whose output is a spatial map or a token sequence
with a gradient of the top score that is not zero on the grid (so a ViT's final norm, whose
patch tokens the class token never reads, is passed over for the last block's ``ln_1``).

Token layouts (:func:`grid_layout`): ``(B, C, h, w)`` is a map; ``(B, h, w, C)`` (Swin) is
recognized by ``h / w`` equal to the input's aspect where ``w / C`` is not; ``(B, N, C)``
(ViT, DeiT, registers) drops the fewest leading tokens that leave a grid of the input's aspect.
A callable ``reshape`` replaces that guess.

Gradients: the pass before the layer runs under ``no_grad``; the hook hands the rest of the
network a copy of a fresh leaf, so autograd records only what follows the layer and the
vector-Jacobian product stops there (no parameter gradient is taken). A layer the scores do not
reach, or reach only through a ``detach`` / ``no_grad`` block, is refused.
"""

from __future__ import annotations

import difflib
import logging
import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mnpo.models.map_source import Tracked

__all__ = ["GridLayout", "HookedSource", "LayerError", "grid_layout", "layer_table", "scores_of"]

log = logging.getLogger(__name__)

#: The most leading (class, distillation, register) tokens ``reshape="auto"`` drops.
MAX_PREFIX_TOKENS = 8
#: Per model: its number of classes, its ``auto`` layer per input size and, per layer, whether
#: ablation can run the network after it alone (each found once).
_KNOWN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class LayerError(ValueError):
    """A target layer that cannot be used, with the reason."""


def scores_of(output: Any) -> Tensor:
    """The class scores ``(B, K)`` in a model's output (module docstring)."""
    scores = output
    if not isinstance(output, Tensor):
        if hasattr(output, "logits"):
            scores = output.logits
        elif isinstance(output, Mapping) and "logits" in output:
            scores = output["logits"]
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            scores = output[0]
        else:
            raise TypeError(f"the model returned {type(output).__name__}; expected class scores: a (B, K) tensor, "
                            "an object with .logits, a dict with 'logits' or a tuple whose first element is them")
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the model's scores must be (B, K), got {shape}")
    return scores


@dataclass(frozen=True)
class GridLayout:
    """How a layer's output maps to ``(B, C, h, w)``: ``kind`` ``map``, ``channels_last`` or
    ``tokens`` (``prefix`` leading tokens dropped, the rest a ``grid`` in row-major order)."""

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    def to_grid(self, t: Tensor) -> Tensor:
        if self.kind == "map":
            return t
        if self.kind == "channels_last":
            return t.permute(0, 3, 1, 2)
        h, w = self.grid
        return t[:, self.prefix:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    def from_grid(self, grid: Tensor, like: Tensor) -> Tensor:
        """``grid`` ``(k B, C, h, w)`` back in the layer's layout; a token layout takes its prefix
        tokens from ``like`` (the layer's output for the ``B`` images, repeated ``k`` times)."""
        if self.kind == "map":
            return grid
        if self.kind == "channels_last":
            return grid.permute(0, 2, 3, 1)
        rows = grid.shape[0]
        prefix = like[:, :self.prefix].repeat_interleave(rows // like.shape[0], dim=0)
        return torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)


def _aspect(h: int, w: int, size: tuple[int, int]) -> bool:
    return h >= 1 and w >= 1 and h * size[1] == w * size[0]


def grid_layout(shape: tuple[int, ...], size: tuple[int, int]) -> GridLayout:
    """The layout of an output of ``shape`` for an input of ``size = (H, W)`` (module docstring).
    Raises ValueError naming the shapes it tried."""
    if len(shape) == 4:
        _, c, h, w = shape
        if _aspect(h, w, size) or h == w == 1:
            return GridLayout("map", (h, w))
        if c * h > 1 and _aspect(c, h, size):
            return GridLayout("channels_last", (c, h))
        raise ValueError(f"output {tuple(shape)} is neither (B, C, h, w) nor (B, h, w, C) with h / w = "
                         f"{size[0]} / {size[1]}, the input's aspect")
    if len(shape) == 3:
        n = shape[1]
        tried = []
        for prefix in range(0, min(MAX_PREFIX_TOKENS, n - 1) + 1):
            m = n - prefix
            h = round((m * size[0] / size[1]) ** 0.5)
            tried.append(f"{prefix} + {h}x{m // max(h, 1)}")
            if h >= 1 and m % h == 0 and _aspect(h, m // h, size) and m > 1:
                return GridLayout("tokens", (h, m // h), prefix)
        raise ValueError(f"{n} tokens of output {tuple(shape)} make no grid of the input's aspect "
                         f"{size[0]}:{size[1]} after dropping 0-{min(MAX_PREFIX_TOKENS, n - 1)} leading tokens "
                         f"(tried {', '.join(tried[:4])}, ...); pass reshape=<callable>")
    raise ValueError(f"output of shape {tuple(shape)} is not a map (B, C, h, w), (B, h, w, C) or tokens (B, N, C)")


class _Custom:
    """A user's ``reshape`` callable as a layout (no way back: no in-network ablation)."""

    kind = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def to_grid(self, t: Tensor) -> Tensor:
        out = self.fn(t)
        if not isinstance(out, Tensor) or out.ndim != 4:
            raise ValueError(f"reshape returned {getattr(out, 'shape', type(out).__name__)}; expected (B, C, h, w)")
        return out


@contextmanager
def _hook(module: nn.Module, fn):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _output_tensor(output: Any, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    raise LayerError(f"layer {name!r} returns {type(output).__name__}, not a tensor; choose a module that "
                     "returns one (e.g. one of its children)")


class HookedSource:
    """The seam for any classifier; see the module docstring.

    reshape: ``"auto"`` or a callable (layer output -> ``(B, C, h, w)``).
    classifier: ``"auto"`` (the last ``nn.Linear`` whose outputs are the scores) or the dotted
        name of the linear layer after global average pooling (read by ``cam`` and ``mnpo``).
    """

    branches = ("head",)
    default_layer = "auto"
    default_gradient_layer = "auto"

    def __init__(self, model: nn.Module, reshape: Any = "auto", classifier: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"compute_maps needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.reshape = reshape
        self.classifier = classifier
        self._names = {m: n for n, m in model.named_modules() if n}
        known = _KNOWN.setdefault(model, {"auto": {}, "num_classes": None})
        self._known = known
        self._auto: dict[tuple[int, int], str] = known["auto"]

    # ---- layers -----------------------------------------------------------------------------

    def module_names(self) -> list[str]:
        return list(self._names.values())

    def resolve(self, layer: Any, images: Tensor | None = None) -> tuple[str, nn.Module]:
        """``(name, module)`` of a layer given by name, module, or ``auto`` / ``head``."""
        if isinstance(layer, nn.Module):
            if layer not in self._names:
                raise LayerError(f"the module {type(layer).__name__} given as target layer is not part of the model")
            return self._names[layer], layer
        if not isinstance(layer, str):
            raise LayerError(f"target layer must be a module name or a module, got {type(layer).__name__}")
        if layer in ("auto", "head"):
            if images is None:
                raise LayerError("the 'auto' layer is found from an input; pass images")
            layer = self.auto_layer(images)
        try:
            return layer, self.model.get_submodule(layer)
        except AttributeError:
            near = difflib.get_close_matches(layer, self.module_names(), n=5, cutoff=0.5)
            hint = f"; nearest: {near}" if near else f"; the model's top-level modules: {[n for n in self.module_names() if '.' not in n][:12]}"
            raise LayerError(f"the model has no module {layer!r}{hint}") from None

    def layout_of(self, t: Tensor, size: tuple[int, int], name: str):
        if callable(self.reshape):
            return _Custom(self.reshape)
        try:
            return grid_layout(tuple(t.shape), size)
        except ValueError as exc:
            raise LayerError(f"layer {name!r}: {exc}") from None

    def candidates(self, images: Tensor) -> list[dict[str, Any]]:
        """Every module of the model (in the order they finish) with its output shape, whether it
        is a map or token output (``layout``), whether it ran once, and whether the top score's
        gradient reaches its grid (``reached``): one forward and one backward on ``images``."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        seen: list[tuple[str, Tensor | None]] = []
        calls: dict[str, int] = {}

        def record(name):
            def fn(module, inputs, output):
                calls[name] = calls.get(name, 0) + 1
                if calls[name] == 1:
                    seen.append((name, output if isinstance(output, Tensor) else None))
            return fn

        handles = [m.register_forward_hook(record(n)) for m, n in self._names.items()]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = images.detach().clone().requires_grad_(True)
                scores = scores_of(self.model(x))
                kept = [(n, t) for n, t in seen if t is not None and t.requires_grad]
                grads = torch.autograd.grad(scores.max(1).values.sum(), [t for _, t in kept], allow_unused=True) \
                    if kept and scores.requires_grad else []
        finally:
            for h in handles:
                h.remove()
        reached = {n: g for (n, _), g in zip(kept, grads)}
        rows = []
        for name, t in seen:
            row: dict[str, Any] = {"name": name, "shape": None if t is None else tuple(t.shape),
                                   "calls": calls[name], "layout": None, "reached": False, "connected": False}
            if t is not None:
                try:
                    layout = self.layout_of(t, size, name)
                    g = reached.get(name)
                    row["layout"] = layout
                    row["connected"] = g is not None
                    row["reached"] = g is not None and bool(layout.to_grid(g).abs().amax() > 0)
                    grid = layout.to_grid(t.detach())
                    row["grid"] = tuple(grid.shape[-2:])
                    row["stride"] = size[0] / grid.shape[-2]
                    row["channels"] = int(grid.shape[1])
                except (LayerError, ValueError):
                    row["layout"] = None
            rows.append(row)
        return rows

    def auto_layer(self, images: Tensor) -> str:
        """The ``auto`` layer for images of this size (module docstring); found once per size."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._auto:
            rows = self.candidates(images[:1])
            chosen = [r["name"] for r in rows if r["layout"] is not None and r["reached"] and r["calls"] == 1
                      and r["grid"][0] * r["grid"][1] > 1]
            if not chosen and any(r["connected"] for r in rows):
                raise LayerError("the top score's gradient is zero at every map or token layer the scores depend on "
                                 "(a classifier initialized to zeros, as torchvision's ViT head is?); name the "
                                 "target layer")
            if not chosen:
                raise LayerError("no module of the model outputs a spatial map or token grid that the scores "
                                 "depend on; name the target layer (mnpo layers --model ... lists them)")
            self._auto[size] = chosen[-1]
            log.info("target layer 'auto' is %r (output %s)", chosen[-1],
                     next(r["shape"] for r in rows if r["name"] == chosen[-1]))
        return self._auto[size]

    # ---- passes -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        if self._known["num_classes"] is None:
            raise RuntimeError("num_classes is known after the first pass (HookedSource.prepare)")
        return self._known["num_classes"]

    def prepare(self, images: Tensor) -> None:
        """Learn the number of classes from one image's scores (once per model)."""
        if self._known["num_classes"] is None:
            with torch.inference_mode():
                self._known["num_classes"] = int(scores_of(self.model(images[:1])).shape[1])

    def logits(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return scores_of(self.model(x))

    def _capture(self, images: Tensor, layer: Any, extra: dict[nn.Module, str] | None = None):
        """One pass without autograd: the layer's output ``A`` (before any in-place change later
        in the network), the scores, and the inputs / outputs of the ``extra`` modules."""
        name, module = self.resolve(layer, images)
        state: dict[str, Any] = {"calls": 0}

        def keep(mod, inputs, output):
            state["calls"] += 1
            t = _output_tensor(output, name)
            state["A"] = t
            return t.clone()  # the rest of the network may change its input in place

        with torch.inference_mode(), _hook(module, keep):
            if extra:  # every call of each (a classifier shared by several branches runs more than once)
                seen: dict[str, list[tuple]] = {}
                handles = [m.register_forward_hook(lambda m_, i, o, n=n: seen.setdefault(n, []).append((i, o)))
                           for m, n in extra.items()]
                try:
                    scores = scores_of(self.model(images))
                finally:
                    for h in handles:
                        h.remove()
                state["extra"] = seen
            else:
                scores = scores_of(self.model(images))
        self._check_calls(name, state["calls"])
        return name, state, scores

    @staticmethod
    def _check_calls(name: str, calls: int) -> None:
        if calls == 0:
            raise LayerError(f"layer {name!r} did not run in the model's forward pass")
        if calls > 1:
            raise LayerError(f"layer {name!r} runs {calls} times in one forward pass (a shared module, such as "
                             "a ResNet block's relu); choose a module that runs once, e.g. its parent")

    def activations(self, images: Tensor, layer: Any) -> tuple[Tensor, Tensor]:
        name, state, scores = self._capture(images, layer)
        layout = self.layout_of(state["A"], tuple(images.shape[-2:]), name)
        return layout.to_grid(state["A"]), scores

    def tracked(self, images: Tensor, layer: Any) -> Tracked:
        name, module = self.resolve(layer, images)
        state: dict[str, Any] = {"calls": 0}

        def swap(mod, inputs, output):
            state["calls"] += 1
            if state["calls"] > 1:
                return None
            leaf = _output_tensor(output, name).detach().requires_grad_(True)
            state["leaf"] = leaf
            torch.set_grad_enabled(True)  # what follows the layer records autograd; no_grad's exit restores
            return leaf.clone()  # in-place work downstream changes the copy, not the leaf

        x = images.clone() if images.is_inference() else images
        with torch.no_grad(), _hook(module, swap):
            scores = scores_of(self.model(x))
        self._check_calls(name, state["calls"])
        if not scores.requires_grad:
            raise LayerError(f"the logits used do not depend on target layer {name!r} through autograd (it does "
                             "not feed them, or a detach() / no_grad block between it and the scores cuts the gradient)")
        layout = self.layout_of(state["leaf"], tuple(images.shape[-2:]), name)
        return Tracked(state["leaf"], (scores,), layout.to_grid)

    def _linear_head(self, scores: Tensor) -> tuple[str, nn.Linear]:
        if self.classifier != "auto":
            name, module = self.resolve(self.classifier)
            if not isinstance(module, nn.Linear):
                raise LayerError(f"classifier {name!r} is a {type(module).__name__}, not an nn.Linear")
            return name, module
        linears = [(n, m) for m, n in self._names.items() if isinstance(m, nn.Linear)
                   and m.out_features == scores.shape[1]]
        if not linears:
            raise LayerError(f"cam and mnpo need a head of global average pooling and one linear layer; the model has "
                             f"no nn.Linear with {scores.shape[1]} outputs (name one with classifier=...)")
        return linears[-1]

    def _verified_head(self, images: Tensor, layer: Any) -> tuple[Tensor, Tensor, Tensor | None, str]:
        """``(A (B, C, h, w), scores, weight or None, why not)``: the weight when the scores are
        ``fc(mean_hw(A))`` on these images, checked within float rounding."""
        probe = self.logits(images[:1])
        fc_name, fc = self._linear_head(probe)
        name, state, scores = self._capture(images, layer, {fc: fc_name})
        A = self.layout_of(state["A"], tuple(images.shape[-2:]), name).to_grid(state["A"])
        if fc_name not in state["extra"]:
            return A, scores, None, f"{fc_name!r} did not run"
        eps = torch.finfo(A.dtype).eps if A.is_floating_point() else 0.0
        out_bound = 4 * eps * float(scores.abs().amax()) + 1e-30
        calls = [(inputs[0], out) for inputs, out in state["extra"][fc_name]
                 if isinstance(out, Tensor) and out.shape == scores.shape
                 and float((out - scores).abs().amax()) <= out_bound]
        if not calls:
            return A, scores, None, f"the scores are not the output of {fc_name!r} (something follows it)"
        pooled = A.mean((2, 3))
        if all(fc_input.shape != pooled.shape for fc_input, _ in calls):
            return A, scores, None, (f"the input of {fc_name!r} has shape {tuple(calls[0][0].shape)}, "
                                     f"not that of {name!r}'s spatial mean {tuple(pooled.shape)}")
        hw = A.shape[-2] * A.shape[-1]
        bound = 4 * hw * eps * float(A.abs().amax()) + 1e-30
        if not any(fc_input.shape == pooled.shape and float((fc_input - pooled).abs().amax()) <= bound
                   for fc_input, _ in calls):
            return A, scores, None, (f"the input of {fc_name!r} is not the spatial mean of {name!r}'s output "
                                     "(something, such as a LayerNorm or a class token, comes between)")
        return A, scores, fc.weight, ""

    def head_weight(self, images: Tensor, layer: Any) -> Tensor | None:
        """The classifier weight when the scores are ``fc(mean_hw(layer))`` on ``images``."""
        return self._verified_head(images, layer)[2]

    def branch_features(self, images: Tensor) -> tuple[Tensor, list[tuple[str, Tensor, Tensor]]]:
        A, scores, weight, why = self._verified_head(images, "auto")
        if weight is None:
            raise LayerError(f"cam and mnpo need a head of global average pooling then one linear layer: {why}. "
                             "Use a CAM-family method (gradcam, layercam, ...) or name the head with classifier=...")
        return scores, [("head", A, weight)]

    def own_cam(self, images: Tensor, targets: Tensor | None, top_k: int | None = None) -> None:
        return None

    def ablation_runs_suffix(self, images: Tensor, layer: Any) -> bool:
        """Whether replacing the layer's output alone by ``k B`` rows gives ``k B`` scores: false
        where the rest of the network also reads an earlier tensor of ``B`` rows (a ViT block's
        residual). Found once per layer, by one pass on two images with the layer's output doubled
        (two, so that an earlier tensor of 2 rows cannot broadcast against 4)."""
        name, module = self.resolve(layer, images)
        known = self._known.setdefault("suffix_only", {})
        if name not in known:
            def doubled(mod, inputs, output):
                t = _output_tensor(output, name)
                return torch.cat([t, t])

            probe = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)
            try:
                with torch.inference_mode(), _hook(module, doubled):
                    known[name] = scores_of(self.model(probe)).shape[0] == 4
            except RuntimeError:
                known[name] = False
            if not known[name]:
                log.info("ablationcam at %r: the rest of the network reads more than that layer's output; "
                         "each image is run again for its ablated copies", name)
        return known[name]

    def ablated_logits(self, images: Tensor, layer: Any, copies: Tensor) -> Tensor:
        """Scores ``(k B, K)`` with the layer's output replaced by ``copies`` ``(k B, C, h, w)``.

        Where the rest of the network reads only the layer's output (:meth:`ablation_runs_suffix`),
        that output alone is replaced (what comes before runs once, on ``images``); otherwise each
        image is run ``k`` times and its output replaced whole.
        """
        name, module = self.resolve(layer, images)
        k = copies.shape[0] // images.shape[0]
        size = tuple(images.shape[-2:])

        def put(mod, inputs, output):
            t = _output_tensor(output, name)
            layout = self.layout_of(t, size, name)
            if layout.kind == "custom":
                raise LayerError(f"ablationcam at {name!r} needs reshape='auto': a custom reshape has no inverse")
            return layout.from_grid(copies.to(t.dtype), t)

        if k > 1 and not self.ablation_runs_suffix(images, layer):
            images = images.repeat_interleave(k, dim=0)
        with torch.inference_mode(), _hook(module, put):
            return scores_of(self.model(images))


def layer_table(model: nn.Module, input_size: int = 224) -> list[dict[str, Any]]:
    """The modules of ``model`` whose output is a map or a token grid for a ``input_size`` square
    input, in the order they finish: name, output shape, grid, stride (input pixels per grid
    cell), channels, how many times it runs, whether the top score's gradient reaches its grid,
    and ``auto`` (the layer ``auto`` picks). From one forward and backward on a random image."""
    model = getattr(model, "wrapped_classifier", model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    images = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    source = HookedSource(model)
    rows = [r for r in source.candidates(images) if r["layout"] is not None]
    usable = [r["name"] for r in rows if r["reached"] and r["calls"] == 1 and r["grid"][0] * r["grid"][1] > 1]
    for r in rows:
        r["auto"] = bool(usable) and r["name"] == usable[-1]
        r["kind"] = r.pop("layout").kind
    return rows
