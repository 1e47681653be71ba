"""Measuring a model: the metrics (SWD, sharpness ratios, FID) and `crispdiff evaluate`."""
