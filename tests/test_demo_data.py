"""Tests of the synthetic defect shapes and the generated demo data set."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.data import gravel

from flawscope.data.demo import (
    DEFECT_TYPES,
    DEMO_TEXTURES,
    MARKER_NAME,
    _random_view,
    draw_defect,
    make_demo_dataset,
)
from flawscope.errors import ConfigError, DataError
from flawscope.synthesis import (
    BLOB_AREA_RATIO,
    SCRATCH_AREA_RATIO,
    STAIN_AREA_RATIO,
    paint_defect,
    random_blob_mask,
    random_scratch_mask,
    random_stain,
)

SMALL = {"image_size": 64, "num_train": 3, "num_test_good": 2, "num_test_per_defect": 2}
AREA_RANGES = {"scratch": SCRATCH_AREA_RATIO, "blob": BLOB_AREA_RATIO, "stain": STAIN_AREA_RATIO}
SHAPE_MAKERS = {
    "scratch": random_scratch_mask,
    "blob": random_blob_mask,
    "stain": lambda shape, rng: random_stain(shape, rng)[1],
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, seed=3, **SMALL)
    return root


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("shape", [(64, 64), (256, 256), (48, 80)])
def test_shape_area_in_documented_range(kind, shape):
    rng = np.random.default_rng(0)
    low, high = AREA_RANGES[kind]
    for _ in range(20):
        mask = SHAPE_MAKERS[kind](shape, rng)
        assert mask.shape == shape and mask.dtype == bool
        assert low <= mask.mean() <= high


def test_scratch_is_one_thin_connected_stroke():
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = random_scratch_mask((256, 256), rng)
        _, num_parts = ndimage.label(mask, structure=np.ones((3, 3)))
        assert num_parts == 1
        # Eroding a stroke at most 5 px wide by a 7 px square leaves nothing.
        assert not ndimage.binary_erosion(mask, np.ones((7, 7))).any()


def test_blob_is_one_region():
    mask = random_blob_mask((128, 128), np.random.default_rng(2))
    assert ndimage.label(mask)[1] == 1


def test_stain_alpha_is_soft_and_its_support_is_the_mask():
    alpha, mask = random_stain((128, 128), np.random.default_rng(4))
    np.testing.assert_array_equal(mask, alpha > 0)
    assert alpha.max() == pytest.approx(1.0)
    assert alpha[mask].min() < 0.5  # soft border, not a hard-edged patch
    assert alpha.min() == 0.0


def test_shapes_are_deterministic_for_a_seed():
    for make in SHAPE_MAKERS.values():
        a = make((64, 64), np.random.default_rng(9))
        b = make((64, 64), np.random.default_rng(9))
        np.testing.assert_array_equal(a, b)


def test_too_small_shape_is_refused():
    with pytest.raises(DataError, match="both sides >= 16"):
        random_blob_mask((8, 64), np.random.default_rng(0))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_paint_changes_exactly_the_masked_pixels_even_when_colour_matches(dtype):
    top = 255 if dtype == np.uint8 else 1.0
    image = np.full((16, 16, 3), 0.5 * top, dtype=np.float64)
    image[:, 8:] = 0  # painting black onto black must still change these pixels
    image = (np.rint(image) if dtype == np.uint8 else image).astype(dtype)
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    before = image.copy()
    painted = paint_defect(image, mask, 0.0, min_change=0.02)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert painted.dtype == image.dtype and painted.shape == image.shape
    change = np.abs(painted.astype(np.float64) - image).max(axis=-1)
    assert (change[mask] >= 0.02 * top - 1e-6).all()
    assert (change[~mask] == 0).all()
    assert (painted >= 0).all() and (painted <= top).all()


def test_paint_grayscale_and_alpha_blend_values():
    image = np.full((4, 4), 100, dtype=np.uint8)
    alpha = np.zeros((4, 4))
    alpha[0, 0], alpha[1, 1] = 0.5, 1.0
    painted = paint_defect(image, alpha, 200)
    assert painted[0, 0] == 150 and painted[1, 1] == 200 and painted[2, 2] == 100


def test_paint_refuses_bad_mask_and_alpha():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(DataError, match="shape"):
        paint_defect(image, np.ones((4, 8), dtype=bool), 255)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        paint_defect(image, np.full((8, 8), 2.0), 255)
    with pytest.raises(DataError, match="dtype"):
        paint_defect(image.astype(np.int32), np.ones((8, 8), dtype=bool), 255)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def testdraw_defect_mask_is_exactly_the_changed_pixels(kind):
    rng = np.random.default_rng(5)
    for _ in range(5):
        clean = _random_view(gravel(), "test", "gravel", 96, rng)
        painted, mask = draw_defect(clean, kind, rng)
        change = np.abs(painted.astype(int) - clean.astype(int)).max(axis=-1)
        assert mask.any()
        assert (change[mask] >= 5).all()  # min_change 0.02 of 255, rounded up
        assert (change[~mask] == 0).all()
        # Visible on average, not just by the minimal guaranteed step.
        assert change[mask].mean() >= 15


def test_layout_matches_mvtec(demo_root):
    for texture in DEMO_TEXTURES:
        folder = demo_root / texture
        assert (folder / MARKER_NAME).is_file()
        assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
        assert len(list((folder / "test" / "good").glob("*.png"))) == 2
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
        for kind in DEFECT_TYPES:
            images = sorted(p.stem for p in (folder / "test" / kind).glob("*.png"))
            masks = sorted(p.name for p in (folder / "ground_truth" / kind).glob("*.png"))
            assert images == ["000", "001"]
            assert masks == [f"{stem}_mask.png" for stem in images]


def test_images_are_rgb_and_masks_binary_nonempty_in_range(demo_root):
    for image_path in demo_root.glob("*/t*/*/*.png"):
        image = Image.open(image_path)
        assert image.mode == "RGB" and image.size == (64, 64)
    for mask_path in demo_root.glob("*/ground_truth/*/*_mask.png"):
        mask = _read(mask_path)
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert set(np.unique(mask)) == {0, 255}
        low, high = AREA_RANGES[mask_path.parent.name]
        assert low <= (mask > 0).mean() <= high


def test_textures_are_tinted(demo_root):
    image = _read(demo_root / "brick" / "train" / "good" / "000.png").astype(float)
    assert image[..., 0].mean() > image[..., 2].mean() + 5  # brick is tinted warm


def test_train_and_test_images_differ(demo_root):
    folder = demo_root / "grass"
    train = [_read(p) for p in (folder / "train" / "good").glob("*.png")]
    for test_path in (folder / "test" / "good").glob("*.png"):
        test = _read(test_path)
        assert all(not np.array_equal(test, t) for t in train)


def test_same_seed_gives_same_bytes_and_other_seed_differs(demo_root, tmp_path):
    make_demo_dataset(tmp_path / "again", seed=3, textures=("brick",), **SMALL)
    make_demo_dataset(tmp_path / "other", seed=4, textures=("brick",), **SMALL)
    first = sorted((demo_root / "brick").rglob("*.png"))
    assert first
    for path in first:
        relative = path.relative_to(demo_root)
        assert (tmp_path / "again" / relative).read_bytes() == path.read_bytes()
    other = tmp_path / "other" / "brick" / "train" / "good" / "000.png"
    assert other.read_bytes() != (demo_root / "brick" / "train" / "good" / "000.png").read_bytes()


def test_refuses_to_touch_a_user_folder(tmp_path):
    user = tmp_path / "grass"
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not made by 'flawscope demo'"):
        make_demo_dataset(tmp_path, overwrite=True, **SMALL)
    assert (user / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "brick").exists()  # checked before anything was written


def test_complete_demo_is_reused_and_overwrite_regenerates(tmp_path):
    (folder,) = make_demo_dataset(tmp_path, textures=("gravel",), **SMALL)
    probe = folder / "train" / "good" / "000.png"
    original = probe.read_bytes()
    probe.write_bytes(b"changed")  # a reused folder is returned as is, so the change stays
    (folder / "train" / "good" / "extra.txt").write_text("x")
    make_demo_dataset(tmp_path, textures=("gravel",), **SMALL)
    assert probe.read_bytes() == b"changed"
    make_demo_dataset(tmp_path, textures=("gravel",), overwrite=True, **SMALL)
    assert probe.read_bytes() == original
    assert not (folder / "train" / "good" / "extra.txt").exists()


def test_incomplete_demo_is_redone_and_other_settings_need_overwrite(tmp_path):
    (folder,) = make_demo_dataset(tmp_path, textures=("brick",), **SMALL)
    (folder / "test" / "blob" / "001.png").unlink()
    make_demo_dataset(tmp_path, textures=("brick",), **SMALL)
    assert (folder / "test" / "blob" / "001.png").is_file()
    with pytest.raises(DataError, match="other settings"):
        make_demo_dataset(tmp_path, textures=("brick",), **{**SMALL, "image_size": 48})
    make_demo_dataset(tmp_path, textures=("brick",), overwrite=True, **{**SMALL, "image_size": 48})
    assert Image.open(folder / "test" / "blob" / "001.png").size == (48, 48)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"textures": ("bricks",)}, "Unknown demo texture"),
        ({"image_size": 16}, "image_size"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_train_and_test_views_come_from_disjoint_rows_of_the_photo():
    # Pixel value = row // 2 in the source, so a view's values tell which rows it was cut from.
    source = np.repeat((np.arange(512) // 2).astype(np.uint8)[:, None], 512, axis=1)
    border = 0.6 * 512 / 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        train = _random_view(source, "train", "brick", 64, rng)[..., 0]  # brick's red tint is 1.0
        test = _random_view(source, "test", "brick", 64, rng)[..., 0]
        assert train.max() <= border + 1 < test.min() + 2
