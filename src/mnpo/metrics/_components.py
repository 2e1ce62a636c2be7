"""Compiled kernels behind :mod:`mnpo.metrics.boxes`.

All thresholds of one score map are answered in two sweeps over its pixels
instead of one ``cv2.findContours`` call per threshold:

* the **foreground sweep** adds pixels from the highest value down and keeps
  the 8-connected components of ``{map > level}`` in a union-find with their
  bounding boxes. The outer contour OpenCV traces around such a component runs
  over its border pixels, so its ``cv2.boundingRect`` is the component's box;
* the **hole sweep** adds pixels from the lowest value up and keeps the
  4-connected components of ``{map <= level}``. One that does not touch the
  image frame is a hole; OpenCV's hole contour runs over the foreground pixels
  4-adjacent to it, so its box is the hole's box grown by one pixel each side.

The largest contour (``max(contours, key=cv2.contourArea)``) needs the area of
the outer border polygon. Where a level has several components, the one with
the most pixels has its border traced (Suzuki-Abe border following, as OpenCV
does) and its polygon area computed by the shoelace formula; any other
component whose box could hold a larger polygon (``(w - 1) * (h - 1)`` bounds
the area of a polygon through pixel centres) is traced too. A hole never beats
its own outer border. Exact ties, which OpenCV breaks by its output order, are
flagged for the caller to ask OpenCV. Tests compare every answer with a plain
per-threshold ``cv2.findContours`` loop.

Box convention: ``(x0, y0, x1, y1)`` in pixels, inclusive, with
``x1 = min(x + w, W - 1)`` as the protocol clips ``cv2.boundingRect``.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # e.g. a GPU image without numba: mnpo.metrics.boxes falls back to OpenCV
    HAVE_NUMBA = False

    def njit(*args, **kwargs):
        return lambda fn: fn

# 8-neighbourhood, clockwise in image coordinates (y down), starting east.
_DX8 = np.array([1, 1, 0, -1, -1, -1, 0, 1], np.int64)
_DY8 = np.array([0, 1, 1, 1, 0, -1, -1, -1], np.int64)
_WEST = 4


def _run_starts() -> np.ndarray:
    """For each 8-bit mask of added ring neighbours (bit d: direction d), the
    number of runs of consecutive added neighbours and the direction where
    each run starts: ``table[mask] = (count, d_1, ..., d_4)``.

    Two consecutive neighbours of the 8-ring touch each other, so a run is
    one component already and needs one find; a full ring is one run.
    """
    table = np.zeros((256, 5), np.int64)
    for mask in range(256):
        on = [(mask >> d) & 1 for d in range(8)]
        starts = [d for d in range(8) if on[d] and not on[d - 1]]
        if mask == 255:
            starts = [0]
        table[mask, 0] = len(starts)
        table[mask, 1:1 + len(starts)] = starts
    return table


_RUNS = _run_starts()

# Fields of ``info`` per pixel (meaningful at roots): size, flag, box x0, y0, x1, y1.
_SIZE, _FLAG, _X0, _Y0, _X1, _Y1 = 0, 1, 2, 3, 4, 5
INFO_FIELDS = 6


def workspace(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scratch memory for the sweeps over an (height, width) map.

    The sweeps work on the map padded by one pixel on each side (flat index
    ``(y + 1) * (width + 2) + x + 1``), so that neighbours need no bounds
    checks. Returns ``parent`` int32 (P,) (-1: not added), ``info`` int32
    (P, INFO_FIELDS) and ``lists`` int32 (4, P) (the roots list, then the
    pixels in value order: padded index, x, y), with ``P = (height + 2) * (width + 2)``.

    Reuse it across calls (a buffer at least this large works for any smaller
    map): a fresh allocation of this size page-faults on every call, which
    costs more than the sweep itself.
    """
    p = (height + 2) * (width + 2)
    return np.empty(p, np.int32), np.empty((p, INFO_FIELDS), np.int32), np.empty((4, p), np.int32)


@njit(cache=True, nogil=True)
def _iou(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1):
    # Inclusive pixel coordinates (+1 in widths), degenerate denominators -> 0.
    iw = min(ax1, bx1) - max(ax0, bx0) + 1
    ih = min(ay1, by1) - max(ay0, by0) + 1
    inter = max(0, iw) * max(0, ih)
    denom = (ax1 - ax0 + 1) * (ay1 - ay0 + 1) + (bx1 - bx0 + 1) * (by1 - by0 + 1) - inter
    if denom <= 0:
        return 0.0
    return inter / denom


@njit(cache=True, nogil=True)
def _max_iou(x0, y0, x1, y1, gt):
    best = 0.0
    for g in range(gt.shape[0]):
        v = _iou(x0, y0, x1, y1, gt[g, 0], gt[g, 1], gt[g, 2], gt[g, 3])
        if v > best:
            best = v
    return best


@njit(cache=True, nogil=True)
def max_iou_rows(boxes, gt):
    """Best IoU with ``gt`` (G, 4) of each row of ``boxes`` (N, 4) -> float64 (N,)."""
    out = np.empty(boxes.shape[0], np.float64)
    for i in range(boxes.shape[0]):
        out[i] = _max_iou(boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3], gt)
    return out


@njit(cache=True, nogil=True)
def sort_pixels(image, lists):
    """Counting sort of the pixels of uint8 ``image`` (H, W) by value, raster
    order within a value, into ``lists[1:4]`` (padded flat index, x, y). Pixels
    of value v lie at ``[start[v]:start[v + 1]]``. Returns ``start`` (257,)."""
    h, w = image.shape
    start = np.zeros(257, np.int64)
    for y in range(h):
        for x in range(w):
            start[image[y, x] + 1] += 1
    for v in range(256):
        start[v + 1] += start[v]
    fill = start[:256].copy()
    for y in range(h):
        row = (y + 1) * (w + 2) + 1
        for x in range(w):
            v = image[y, x]
            k = fill[v]
            lists[1, k] = row + x
            lists[2, k] = x
            lists[3, k] = y
            fill[v] = k + 1
    return start


@njit(cache=True, nogil=True)
def _find(parent, i):
    """Root of pixel ``i``, with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def _union(parent, info, ra, rb, foreground):
    """Merge the trees rooted at ``ra`` and ``rb`` (union by size); returns the root.

    The flag keeps the raster-first pixel (foreground) or whether the
    component touches the frame (background).
    """
    if ra == rb:
        return ra
    if info[ra, _SIZE] < info[rb, _SIZE]:
        ra, rb = rb, ra
    parent[rb] = ra
    info[ra, _SIZE] += info[rb, _SIZE]
    if foreground:
        info[ra, _FLAG] = min(info[ra, _FLAG], info[rb, _FLAG])
    else:
        info[ra, _FLAG] = max(info[ra, _FLAG], info[rb, _FLAG])
    info[ra, _X0] = min(info[ra, _X0], info[rb, _X0])
    info[ra, _Y0] = min(info[ra, _Y0], info[rb, _Y0])
    info[ra, _X1] = max(info[ra, _X1], info[rb, _X1])
    info[ra, _Y1] = max(info[ra, _Y1], info[rb, _Y1])
    return ra


@njit(cache=True, nogil=True)
def _attach(parent, info, root, p, px, py, foreground):
    """Make pixel ``p`` at (px, py) a child of ``root`` and grow the root's fields."""
    parent[p] = root
    info[root, _SIZE] += 1
    if foreground:
        info[root, _FLAG] = min(info[root, _FLAG], p)
    info[root, _X0] = min(info[root, _X0], px)
    info[root, _Y0] = min(info[root, _Y0], py)
    info[root, _X1] = max(info[root, _X1], px)
    info[root, _Y1] = max(info[root, _Y1], py)


@njit(cache=True, nogil=True)
def _add_values(width, parent, info, lists, start, lo, hi, n_roots, foreground):
    """Add the pixels whose value lies in ``[lo, hi]`` and union them with
    their already added neighbours (8-connected for the foreground, 4 for the
    background). Returns the new length of the roots list (``lists[0]``).

    Around a pixel, two consecutive neighbours of the 8-ring touch each other,
    so a run of added neighbours is one component already: one find per run.
    A pixel that touches one component joins it directly; only a pixel that
    touches none starts a new root.
    """
    stride = width + 2
    ring = np.array([1, stride + 1, stride, stride - 1, -1, -stride - 1, -stride, -stride + 1])
    for k in range(start[lo], start[hi + 1]):
        p = lists[1, k]
        root = -1
        if foreground:
            mask = 0
            for d in range(8):
                if parent[p + ring[d]] >= 0:
                    mask |= 1 << d
            for t in range(1, _RUNS[mask, 0] + 1):
                r = _find(parent, p + ring[_RUNS[mask, t]])
                root = r if root < 0 else _union(parent, info, root, r, True)
        else:
            for d in range(0, 8, 2):
                q = p + ring[d]
                if parent[q] >= 0:
                    r = _find(parent, q)
                    root = r if root < 0 else _union(parent, info, root, r, False)
        px = lists[2, k]
        py = lists[3, k]
        if root >= 0:
            _attach(parent, info, root, p, px, py, foreground)
        else:
            parent[p] = p
            info[p, _SIZE] = 1
            info[p, _FLAG] = p if foreground else 0
            info[p, _X0] = px
            info[p, _Y0] = py
            info[p, _X1] = px
            info[p, _Y1] = py
            lists[0, n_roots] = p
            n_roots += 1
    return n_roots


@njit(cache=True, nogil=True)
def _on(image, level, x, y):
    h, w = image.shape
    return 0 <= x < w and 0 <= y < h and image[y, x] > level


@njit(cache=True, nogil=True)
def outer_area2(image, level, start):
    """Twice the area of the outer border polygon of the component whose
    raster-first pixel is ``start`` (flat index), binary image ``image > level``.

    Suzuki-Abe outer border following over the 8-neighbourhood, the polygon's
    vertices at pixel centres, as ``cv2.contourArea`` of the contour
    ``cv2.findContours`` returns (CHAIN_APPROX_SIMPLE drops only collinear
    points, which leaves the area unchanged). int64, exact.
    """
    w = image.shape[1]
    y0 = start // w
    x0 = start - y0 * w
    # 3.1: clockwise from the west neighbour, the first foreground neighbour.
    d1 = -1
    for t in range(8):
        d = (_WEST + t) % 8
        if _on(image, level, x0 + _DX8[d], y0 + _DY8[d]):
            d1 = d
            break
    if d1 < 0:
        return 0  # isolated pixel
    x1, y1 = x0 + _DX8[d1], y0 + _DY8[d1]
    # 3.2-3.5: walk counterclockwise around the current pixel from the previous one.
    px, py = x1, y1  # (i2, j2)
    cx, cy = x0, y0  # (i3, j3)
    area2 = 0
    while True:
        back = 0
        for d in range(8):
            if cx + _DX8[d] == px and cy + _DY8[d] == py:
                back = d
                break
        nx, ny = cx, cy
        for t in range(1, 9):
            d = (back - t) % 8
            if _on(image, level, cx + _DX8[d], cy + _DY8[d]):
                nx, ny = cx + _DX8[d], cy + _DY8[d]
                break
        area2 += cx * ny - nx * cy
        if nx == x0 and ny == y0 and cx == x1 and cy == y1:
            break
        px, py, cx, cy = cx, cy, nx, ny
    return abs(area2)


@njit(cache=True, nogil=True)
def _compact(parent, info, lists, n_roots, foreground):
    """Keep the live roots (and, for the background, only the holes)."""
    live = 0
    for k in range(n_roots):
        r = lists[0, k]
        if parent[r] == r and (foreground or info[r, _FLAG] == 0):
            lists[0, live] = r
            live += 1
    return live


@njit(cache=True, nogil=True)
def _unpad(q, width):
    """Flat index in the (H, W) map of the padded flat index ``q``."""
    y = q // (width + 2)
    return (y - 1) * width + (q - y * (width + 2) - 1)


@njit(cache=True, nogil=True)
def foreground_sweep(image, levels, gt, parent, info, lists, start):
    """Components of ``image > level`` for every level, 8-connected.

    Args:
        image: uint8 (H, W), the score map as ``floor(map * 255)``.
        levels: int64 (J,), distinct binarization levels in ascending order.
        gt: int64 (G, 4), ground-truth boxes (x0, y0, x1, y1) in the map's frame.
        parent, info, lists: scratch from :func:`workspace` (for >= this size),
            ``lists[1:4]`` and ``start`` filled by :func:`sort_pixels`.
        start: int64 (257,), from :func:`sort_pixels`.

    Returns:
        largest: int64 (J, 4), box of the largest contour (zeros when there is
            no foreground); valid where ``decided``.
        decided: bool (J,), False where areas tie and OpenCV's order decides.
        multi_iou: float64 (J,), best IoU with ``gt`` over all components'
            boxes (the empty box's IoU when there is no foreground).
        count: int64 (J,), number of components.
    """
    h, w = image.shape
    parent[: (h + 2) * (w + 2)] = -1
    nlev = levels.shape[0]
    largest = np.zeros((nlev, 4), np.int64)
    decided = np.ones(nlev, np.bool_)
    multi_iou = np.zeros(nlev, np.float64)
    count = np.zeros(nlev, np.int64)
    empty_iou = _max_iou(0, 0, 0, 0, gt)

    n_roots = 0
    top = 255  # values > top are already added
    for j in range(nlev - 1, -1, -1):
        level = levels[j]
        if top > level:
            n_roots = _add_values(w, parent, info, lists, start, level + 1, top, n_roots, True)
        top = level
        n_roots = _compact(parent, info, lists, n_roots, True)
        live = n_roots
        count[j] = live
        if live == 0:
            multi_iou[j] = empty_iou
            continue
        best = 0.0
        champion = lists[0, 0]
        for k in range(live):
            r = lists[0, k]
            v = _max_iou(info[r, _X0], info[r, _Y0], min(info[r, _X1] + 1, w - 1),
                         min(info[r, _Y1] + 1, h - 1), gt)
            best = max(best, v)
            if info[r, _SIZE] > info[champion, _SIZE]:
                champion = r
        multi_iou[j] = best
        if live > 1:
            area2 = outer_area2(image, level, _unpad(info[champion, _FLAG], w))
            tied = False
            for k in range(live):
                r = lists[0, k]
                if r == champion:
                    continue
                bound2 = 2 * (info[r, _X1] - info[r, _X0]) * (info[r, _Y1] - info[r, _Y0])
                if bound2 < area2:
                    continue
                a2 = outer_area2(image, level, _unpad(info[r, _FLAG], w))
                if a2 > area2:
                    champion, area2, tied = r, a2, False
                elif a2 == area2:
                    tied = True
            decided[j] = not tied
        r = champion
        largest[j, 0] = info[r, _X0]
        largest[j, 1] = info[r, _Y0]
        largest[j, 2] = min(info[r, _X1] + 1, w - 1)
        largest[j, 3] = min(info[r, _Y1] + 1, h - 1)
    return largest, decided, multi_iou, count


@njit(cache=True, nogil=True)
def hole_sweep(image, levels, gt, parent, info, lists, start):
    """Best IoU of hole contours at every level.

    Holes of ``image > level`` are the 4-connected components of
    ``image <= level`` that do not touch the image frame. The padding ring is
    added first as one component flagged "frame", so a component touches the
    frame exactly when it is merged with it.

    Args:
        image: uint8 (H, W).
        levels: int64 (J,), ascending distinct levels.
        gt: int64 (G, 4) ground-truth boxes.
        parent, info, lists: scratch from :func:`workspace` (for >= this size),
            ``lists[1:4]`` and ``start`` filled by :func:`sort_pixels`.
        start: int64 (257,), from :func:`sort_pixels`.

    Returns:
        hole_iou: float64 (J,), best IoU over hole contours' boxes (0 if none).
        holes: int64 (J,), number of holes.
    """
    h, w = image.shape
    stride = w + 2
    size = (h + 2) * stride
    parent[:size] = -1
    # The padding ring: one component rooted at index 0, flagged as the frame.
    for x in range(stride):
        parent[x] = 0
        parent[size - stride + x] = 0
    for y in range(1, h + 1):
        parent[y * stride] = 0
        parent[y * stride + w + 1] = 0
    info[0, _SIZE] = size
    info[0, _FLAG] = 1
    nlev = levels.shape[0]
    hole_iou = np.zeros(nlev, np.float64)
    holes = np.zeros(nlev, np.int64)
    n_roots = 0
    bottom = 0  # values < bottom are already added
    for j in range(nlev):
        level = levels[j]
        if level >= bottom:
            n_roots = _add_values(w, parent, info, lists, start, bottom, level, n_roots, False)
        bottom = level + 1
        n_roots = _compact(parent, info, lists, n_roots, False)
        best = 0.0
        for k in range(n_roots):
            r = lists[0, k]
            # The hole contour runs one pixel outside the hole.
            v = _max_iou(info[r, _X0] - 1, info[r, _Y0] - 1, min(info[r, _X1] + 2, w - 1),
                         min(info[r, _Y1] + 2, h - 1), gt)
            best = max(best, v)
        hole_iou[j] = best
        holes[j] = n_roots
    return hole_iou, holes
