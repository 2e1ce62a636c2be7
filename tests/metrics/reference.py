"""Naive references of the localization metrics, written from their definitions (for the tests)."""

from __future__ import annotations

import numpy as np


def naive_pxap(maps, masks, thresholds) -> float:
    """PxAP (percent) of score maps against masks (1 object, 0 background, 255 ignored), from the
    definition: the operating points are "score >= t" for t in the thresholds and wsolevaluation's
    extra edges 1 and 2, from the highest t down; at each, tp and fp are the object and
    background pixels at or above t; precision tp / (tp + fp) (undefined when nothing is
    predicted), recall tp / (object pixels); the area is the sum of precision times the recall
    gained since the previous point, over the points where something is predicted."""
    scores = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    labels = np.concatenate([np.asarray(k).ravel() for k in masks])
    fg, bg = scores[labels == 1], scores[labels == 0]
    points = sorted(list(np.asarray(thresholds, np.float64)) + [1.0, 2.0], reverse=True)
    area, last_recall = 0.0, 0.0
    for t in points:
        tp, fp = int((fg >= t).sum()), int((bg >= t).sum())
        recall = tp / len(fg)
        if tp + fp:
            area += tp / (tp + fp) * (recall - last_recall)
        last_recall = recall
    return 100 * area
