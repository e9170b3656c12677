"""Render the grid in docs/ENGINE.md: every digit class (rows) x N seeds (columns), exact MAR."""

from __future__ import annotations

import sys

import numpy as np

from engine.images import encode_image, images_to_uint8, make_grid
from engine.pipeline import Pipeline

out, per_class = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
pipe = Pipeline.load("digits", device="cpu")
classes = [c for c in range(10) for _ in range(per_class)]
seeds = list(range(len(classes)))
images = images_to_uint8(pipe.generate(classes, seeds))
grid = make_grid(np.asarray(images), nrow=per_class)
with open(out, "wb") as f:
    f.write(encode_image(grid, "png", scale=3))
