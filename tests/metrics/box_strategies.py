"""Hypothesis strategies shared by the box tests."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def scoremaps(draw):
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 24))
    levels = draw(st.sampled_from([2, 3, 5, 256]))
    raw = draw(hnp.arrays(np.int64, (h, w), elements=st.integers(0, levels - 1)))
    s = raw / (levels - 1)
    if draw(st.booleans()):
        s = s.astype(np.float32)
    x0 = draw(st.integers(0, w - 1))
    y0 = draw(st.integers(0, h - 1))
    gt = [[x0, y0, draw(st.integers(x0, w - 1)), draw(st.integers(y0, h - 1))]]
    return s, gt
