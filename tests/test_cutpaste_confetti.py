"""CutPaste and confetti noise: exact masks, seeding, foreground masks, sizes."""

from functools import partial

import numpy as np
import pytest

from flawscope.errors import ConfigError, DataError
from flawscope.synthesis import CUTPASTE_VARIANTS, confetti_noise, cutpaste


def _image(dtype=np.uint8, channels=3, size=96, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels else (size, size)
    pixels = rng.integers(20, 236, size=shape)
    return pixels.astype(np.uint8) if dtype == np.uint8 else (pixels / 255).astype(dtype)


GENERATORS = [partial(cutpaste, variant=v) for v in CUTPASTE_VARIANTS]
GENERATORS.append(confetti_noise)
IDS = [f"cutpaste-{v}" for v in CUTPASTE_VARIANTS] + ["confetti"]


@pytest.mark.parametrize("generate", GENERATORS, ids=IDS)
@pytest.mark.parametrize(("dtype", "channels"), [(np.uint8, 3), (np.float32, 3), (np.float64, 0)])
def test_mask_is_exactly_the_changed_pixels(generate, dtype, channels):
    for seed in range(5):
        image = _image(dtype, channels, seed=seed)
        before = image.copy()
        out, mask = generate(image, np.random.default_rng(seed))
        assert np.array_equal(image, before), "the input must not be modified"
        assert out.shape == image.shape and out.dtype == image.dtype and mask.shape == image.shape[:2]
        changed = out != image
        changed = changed.any(-1) if changed.ndim == 3 else changed
        assert mask.dtype == bool and np.array_equal(mask, changed)
        assert mask.any()
        assert out.min() >= 0 and out.max() <= (255 if dtype == np.uint8 else 1)


@pytest.mark.parametrize("generate", GENERATORS, ids=IDS)
def test_same_seed_gives_same_output(generate):
    image = _image()
    a, mask_a = generate(image, np.random.default_rng(7))
    b, mask_b = generate(image, np.random.default_rng(7))
    c, _ = generate(image, np.random.default_rng(8))
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("generate", GENERATORS, ids=IDS)
def test_defects_stay_inside_the_foreground(generate):
    foreground = np.zeros((96, 96), dtype=bool)
    foreground[50:90, 10:60] = True
    for seed in range(8):
        image = _image(seed=seed)
        out, mask = generate(image, np.random.default_rng(seed), foreground=foreground)
        assert mask.any() and not (mask & ~foreground).any()
        assert np.array_equal(out[~foreground], image[~foreground])


def test_normal_cutpaste_pastes_one_rectangle_of_the_documented_size():
    for seed in range(10):
        _, mask = cutpaste(_image(size=128, seed=seed), np.random.default_rng(seed), variant="normal")
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.9 * 0.02 <= box / 128**2 <= 0.15 * 1.1
        assert mask.sum() >= 0.95 * box  # on a noisy image almost every pasted pixel changes


def test_scar_is_thin():
    for seed in range(10):
        _, mask = cutpaste(_image(size=256, seed=seed), np.random.default_rng(seed), variant="scar")
        assert 0 < mask.sum() <= 16 * 25 * 1.1


def test_confetti_darkens_saturated_images():
    # Adding cannot change a white image, so the noise is subtracted (FCDD's rule) and the defect is still there.
    for seed in range(5):
        out, mask = confetti_noise(np.full((96, 96, 3), 255, np.uint8), np.random.default_rng(seed))
        assert mask.any() and (out[mask].min(-1) < 255).all()


def test_bad_arguments_raise_clear_errors():
    image = _image()
    with pytest.raises(ConfigError, match="variant"):
        cutpaste(image, np.random.default_rng(0), variant="triangle")
    with pytest.raises(DataError, match="foreground"):
        confetti_noise(image, np.random.default_rng(0), foreground=np.ones((10, 10), bool))
    with pytest.raises(DataError, match="empty"):
        cutpaste(image, np.random.default_rng(0), foreground=np.zeros((96, 96), bool))


def test_cutpaste_area_and_aspect_ranges_set_the_rectangle():
    # Area a quarter of the image and aspect 1: a 32 x 32 square on a 64-px image, wherever it lands.
    for seed in range(5):
        _, mask = cutpaste(
            _image(size=64, seed=seed), np.random.default_rng(seed), area_ratio=(0.25, 0.25), aspect_ratio=(1, 1)
        )
        rows, cols = np.nonzero(mask)
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (32, 32)


def test_confetti_square_sides_follow_side_px():
    from flawscope.synthesis.confetti import _layer

    for side in (6, 20):
        layer = _layer((64, 64), 1, np.array([[32, 32]]), np.ones((1, 1)), np.random.default_rng(0), (side, side))
        assert 0.8 * side**2 <= layer.sum() <= 1.25 * side**2  # one rotated square, rasterised


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"area_ratio": (0.2, 0.1)}, r"area_ratio needs two fractions.*got 0.2,0.1"),
        ({"aspect_ratio": (2.0, 3.0)}, r"aspect_ratio needs .*0 < LOW <= 1 <= HIGH.*got 2.0,3.0"),
        ({"jitter": 1.5}, r"jitter .*\[0, 1\].*got 1.5"),
    ],
)
def test_bad_cutpaste_ranges_name_the_argument(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cutpaste(_image(), np.random.default_rng(0), **kwargs)


def test_bad_confetti_parameters_name_the_argument():
    with pytest.raises(ConfigError, match=r"side_px needs two square sides.*got 9,3"):
        confetti_noise(_image(), np.random.default_rng(0), side_px=(9, 3))
    with pytest.raises(ConfigError, match=r"probabilities COLOUR,GREY .*\[0, 1\].*got 2, 0"):
        confetti_noise(_image(), np.random.default_rng(0), color_prob=2, grey_prob=0)
