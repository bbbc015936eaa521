"""Real image content for the zoo: 32x32 crops of the photographs bundled with scikit-image.

Only images whose files ship inside the scikit-image wheel are used (`skimage.data` reads them from
its own folder, no download, no pooch): the photographs among them, not the drawings (logo,
colorwheel, horse) or the 25x25 LFW faces. Grayscale photographs are repeated to 3 channels.

Each photograph is used at three scales (x1, x1/2, x1/4, anti-aliased) so that a 32x32 crop sees
textures as well as object parts. Every scaled view is cut by columns into two regions: the left
`TRAIN_FRACTION` gives the training crops (what generators and discriminators learn from), the rest
the sampling crops (the conditioning inputs of image-to-image generators when the zoo's images are
made), so no sampled image is conditioned on content a generator was trained on. A view is used
only if both regions fit a crop.
"""

from __future__ import annotations

import functools

import numpy as np

from adaparse_jax.zoo.schema import IMAGE_SIZE

# skimage.data functions of bundled photographs (checked offline in tests/test_zoo.py).
PHOTOGRAPHS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
    "stereo_motorcycle", "text",
)
SCALES = (1.0, 0.5, 0.25)
TRAIN_FRACTION = 0.75
REGIONS = ("train", "sample")
PHOTO_STREAM = 1  # numpy SeedSequence stream of the crop pools (see schema.SCHEMA_STREAM)


def load_photograph(name: str) -> np.ndarray:
    """One bundled photograph as float32 [H, W, 3] in [0, 1]."""
    import skimage.data

    if name not in PHOTOGRAPHS:
        raise ValueError(f"{name!r} is not one of the zoo's photographs {PHOTOGRAPHS}")
    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity): the left view
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return (image[..., :3].astype(np.float32) / 255.0)


@functools.lru_cache(maxsize=1)
def photo_views() -> tuple[tuple[str, float, np.ndarray], ...]:
    """(photograph, scale, float32 [H, W, 3] image) for every scaled view whose regions fit a crop."""
    from skimage.transform import rescale

    views = []
    for name in PHOTOGRAPHS:
        image = load_photograph(name)
        for scale in SCALES:
            view = image if scale == 1.0 else rescale(
                image, scale, channel_axis=-1, anti_aliasing=True).astype(np.float32)
            h, w = view.shape[:2]
            split = int(round(w * TRAIN_FRACTION))
            if h >= IMAGE_SIZE and split >= IMAGE_SIZE and w - split >= IMAGE_SIZE:
                views.append((name, scale, view))
    return tuple(views)


def region_bounds(width: int, region: str) -> tuple[int, int]:
    """[start, stop) columns of a view's training or sampling region."""
    split = int(round(width * TRAIN_FRACTION))
    if region == "train":
        return 0, split
    if region == "sample":
        return split, width
    raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")


def crop_positions(num_crops: int, region: str, seed: int) -> list[tuple[str, float, int, int, bool]]:
    """(photograph, scale, y, x, flipped) of `num_crops` random crops inside `region`: photograph
    first (each equally likely), then one of its scales, then a position. Deterministic."""
    by_photo: dict[str, list[tuple[float, int, int]]] = {}
    for name, scale, view in photo_views():
        by_photo.setdefault(name, []).append((scale, *view.shape[:2]))
    photographs = sorted(by_photo)
    rng = np.random.default_rng([seed, PHOTO_STREAM, REGIONS.index(region)])
    out = []
    for _ in range(num_crops):
        name = photographs[rng.integers(len(photographs))]
        scale, h, w = by_photo[name][rng.integers(len(by_photo[name]))]
        start, stop = region_bounds(w, region)
        y = int(rng.integers(0, h - IMAGE_SIZE + 1))
        x = int(rng.integers(start, stop - IMAGE_SIZE + 1))
        out.append((name, scale, y, x, bool(rng.random() < 0.5)))
    return out


def crop_pool(num_crops: int, region: str, seed: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3] crops at `crop_positions` (flipped horizontally where drawn)."""
    views = {(name, scale): view for name, scale, view in photo_views()}
    out = np.empty((num_crops, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, (name, scale, y, x, flipped) in enumerate(crop_positions(num_crops, region, seed)):
        crop = views[(name, scale)][y: y + IMAGE_SIZE, x: x + IMAGE_SIZE]
        if flipped:
            crop = crop[:, ::-1]
        out[i] = np.clip(np.round(crop * 255.0), 0, 255).astype(np.uint8)
    return out
