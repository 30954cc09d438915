"""Tests of flawscope.data: decoding, layouts, splits and the torch dataset, on tiny fixtures under tmp_path."""

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flawscope.data import (
    DatasetSplit,
    ImageDataset,
    Sample,
    collate,
    find_images,
    list_categories,
    load_anomaly_folder,
    load_dataset,
    make_loader,
    preprocess,
    preprocess_mask,
    read_image,
    read_mask,
    split_validation,
)
from flawscope.data.io import set_pixel_limit_from_environment
from flawscope.errors import ConfigError, DataError

MTD = Path(__file__).parents[1] / ".." / "shared" / "datasets" / "mtd"
RNG = np.random.default_rng(0)


def _save_rgb(path: Path, height: int = 24, width: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _save_mask(path: Path, height: int = 24, width: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((height, width), np.uint8)
    mask[4:10, 6:14] = 255
    Image.fromarray(mask).save(path)
    return path


def _make_mvtec(root: Path) -> Path:
    """A category with 5 train images (one .PNG), 2 good and 3 defective test images of 2 types, plus hidden files."""
    for i in range(4):
        _save_rgb(root / "train" / "good" / f"{i:03d}.png")
    _save_rgb(root / "train" / "good" / "004.PNG")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    for i in range(2):
        _save_rgb(root / "test" / "good" / f"{i:03d}.png")
    for defect, count in (("crack", 2), ("scratch", 1)):
        for i in range(count):
            _save_rgb(root / "test" / defect / f"{i:03d}.png")
            _save_mask(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def _load_naming_unread(root: Path, entries: list[tuple[str, str]]) -> DatasetSplit:
    """load_dataset(root), asserting one warning that names each (entry, reason) it did not read, and no more."""
    with pytest.warns(UserWarning, match=f"{len(entries)} entries") as caught:
        split = load_dataset(root)
    message = str(caught[0].message)
    for name, reason in entries:
        assert f"{name} ({reason}" in message
    return split


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


# --- read_image / read_mask ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (3, 2), 100), (100, 100, 100)),
        (Image.new("RGBA", (3, 2), (200, 100, 50, 255)), (200, 100, 50)),
        (Image.new("RGBA", (3, 2), (200, 100, 50, 0)), (0, 0, 0)),  # transparent -> black
        (Image.new("RGBA", (3, 2), (200, 100, 50, 51)), (40, 20, 10)),  # alpha 0.2 composited on black
        (Image.new("LA", (3, 2), (90, 255)), (90, 90, 90)),
        (Image.fromarray(np.full((2, 3), 25700, np.uint16)), (100, 100, 100)),  # I;16: 25700 / 257
        (Image.fromarray(np.full((2, 3), 65535, np.uint16)), (255, 255, 255)),  # full 16-bit range, not clipped
    ],
)
def test_read_image_converts_modes_to_rgb_uint8(tmp_path, image, expected):
    path = tmp_path / "image.png"
    image.save(path)
    pixels = read_image(path)
    assert pixels.shape == (2, 3, 3) and pixels.dtype == np.uint8
    assert (pixels == np.array(expected, np.uint8)).all()


def test_an_eight_bit_image_saved_in_a_wide_mode_is_read_at_16_bit_scale_with_a_warning(tmp_path):
    Image.new("L", (3, 2), 200).convert("I").save(tmp_path / "eight-bit-as-32.tif")
    with pytest.warns(UserWarning, match=r"eight-bit-as-32\.tif is a I image whose values are all at most 200"):
        pixels = read_image(tmp_path / "eight-bit-as-32.tif")
    assert (pixels == 1).all()  # 200 / 257, the documented rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real 16-bit image, and a black one, say nothing
        Image.fromarray(np.full((2, 3), 25700, np.uint16)).save(tmp_path / "sixteen.png")
        Image.fromarray(np.zeros((2, 3), np.uint16)).save(tmp_path / "black.png")
        read_image(tmp_path / "sixteen.png")
        read_image(tmp_path / "black.png")


def test_read_image_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "transparent.png", transparency=1)
    assert (read_image(tmp_path / "opaque.png") == [10, 200, 30]).all()
    assert (read_image(tmp_path / "transparent.png") == 0).all()


@pytest.mark.parametrize("name", ["a.jpg", "a.JPEG", "a.bmp", "a.tif", "a.tiff", "a.webp"])
def test_read_image_common_formats(tmp_path, name):
    Image.new("RGB", (7, 5), (0, 128, 255)).save(tmp_path / name, **({"lossless": True} if "webp" in name else {}))
    pixels = read_image(tmp_path / name)
    assert pixels.shape == (5, 7, 3)
    assert np.abs(pixels.astype(int) - [0, 128, 255]).max() <= 3  # jpeg is lossy


def test_read_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.new("RGB", (40, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)


def test_read_image_truncated_jpeg(tmp_path):
    _save_rgb(tmp_path / "full.jpg", 64, 64)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated or corrupt"):
        read_image(tmp_path / "cut.jpg")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # flawscope refuses; Pillow warns
@pytest.mark.parametrize("limit", [500, 1000])
def test_read_image_above_the_decompression_bomb_limit(tmp_path, monkeypatch, limit):
    # 40x30 = 1200 pixels: Pillow itself refuses above 2x its limit (500) and only warns above 1x (1000); flawscope
    # refuses both, so the limit the message names is the one applied.
    Image.new("RGB", (40, 30)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    expected = rf"huge\.png: the image has 1,200 pixels, above the safety limit of {limit:,} pixels.*Downscale"
    with pytest.raises(DataError, match=expected + ".*FLAWSCOPE_MAX_IMAGE_PIXELS=N") as caught:
        read_image(tmp_path / "huge.png")
    assert "truncated or corrupt" not in str(caught.value)
    monkeypatch.setenv("FLAWSCOPE_MAX_IMAGE_PIXELS", "1200")  # what the command line applies before each command
    set_pixel_limit_from_environment()
    assert read_image(tmp_path / "huge.png").shape == (30, 40, 3)
    monkeypatch.setenv("FLAWSCOPE_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(ConfigError, match="FLAWSCOPE_MAX_IMAGE_PIXELS='many': expected a whole number"):
        set_pixel_limit_from_environment()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # flawscope refuses; Pillow warns
def test_the_pixel_limit_holds_with_several_threads_reading(tmp_path, monkeypatch):
    # Turning Pillow's warning into an error with catch_warnings let one read in 1,200 through under four threads.
    from concurrent.futures import ThreadPoolExecutor

    Image.new("RGB", (40, 30)).save(tmp_path / "huge.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # huge: between 1x and 2x, where Pillow only warns
    filters = list(warnings.filters)

    def refused(path: Path) -> bool:
        try:
            read_image(path)
        except DataError:
            return True
        return False

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(refused, [tmp_path / "huge.png", tmp_path / "small.png"] * 200))
    assert results == [True, False] * 200
    assert warnings.filters == filters  # reading changes no process-wide warning filter
    with pytest.raises(DataError, match="1,200 pixels, above the safety limit of 1,000"):
        read_image(Image.open(tmp_path / "huge.png"))  # an opened PIL image too


def test_read_image_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.png.*not an image format"):
        read_image(tmp_path / "notes.png")


def test_read_image_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"missing\.png does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="is a folder"):
        read_image(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")  # exists, but is no file: said so, not "does not exist" (never opened)
    with pytest.raises(DataError, match=r"pipe\.png is not a regular file"):
        read_image(tmp_path / "pipe.png")


def test_read_mask_nonzero_is_defect(tmp_path):
    Image.fromarray(np.array([[0, 1, 255], [0, 7, 0]], np.uint8)).save(tmp_path / "ids.png")
    assert read_mask(tmp_path / "ids.png").tolist() == [[False, True, True], [False, True, False]]
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background must not count as defect
    rgba[0, 0] = (255, 255, 255, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert read_mask(tmp_path / "rgba.png").sum() == 1


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_read_mask_jpeg_is_cut_at_half_range(tmp_path, mode):
    disc = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(disc).ellipse((13, 11, 45, 50), fill=255)
    disc.convert(mode).save(tmp_path / "mask.jpg", quality=75)
    truth = np.asarray(disc) > 0
    noisy = np.asarray(Image.open(tmp_path / "mask.jpg").convert("L"))
    assert (noisy[~truth] > 0).sum() > 100  # the compression does leave faint pixels around the disc
    assert np.array_equal(read_mask(tmp_path / "mask.jpg"), truth)


def test_read_mask_wrong_size_names_both_files(tmp_path):
    mask = _save_mask(tmp_path / "m.png", 10, 12)
    with pytest.raises(DataError, match=r"m\.png is 10x12 \(height x width\) but its image .*img\.png is 24x32"):
        read_mask(mask, size=(24, 32), image_path=tmp_path / "img.png")


# --- load_dataset ----------------------------------------------------------------------------------------------------


def test_load_mvtec_lists_sorted_samples_and_ignores_hidden_files(tmp_path):
    root = _make_mvtec(tmp_path / "bottle")
    (root / "train" / "good" / "Thumbs.db").write_bytes(b"\0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = load_dataset(root)
    assert split.layout == "mvtec" and split.root == tmp_path / "bottle"
    assert [s.path.name for s in split.train] == ["000.png", "001.png", "002.png", "003.png", "004.PNG"]
    assert [(s.defect_type, s.label, s.path.name) for s in split.test] == [
        ("crack", 1, "000.png"),
        ("crack", 1, "001.png"),
        ("good", 0, "000.png"),
        ("good", 0, "001.png"),
        ("scratch", 1, "000.png"),
    ]
    assert split.test[1].mask_path == tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    assert split.test[2].mask_path is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_load_mvtec_names_every_entry_it_does_not_read(tmp_path):
    root = _make_mvtec(tmp_path / "bottle")
    (root / "train" / "good" / "README.txt").write_text("not an image")
    _save_rgb(root / "train" / "good" / "batch2" / "005.png")
    Image.new("RGB", (32, 24)).save(root / "test" / "crack" / "009.gif")
    (root / "test" / "good" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _save_mask(root / "ground_truth" / "scratch" / "007_mask.png")
    _save_rgb(root / "train" / "loose.png")
    _save_rgb(root / "train" / "good_batch2" / "000.png")
    _save_rgb(root / "test" / "loose.png")
    _save_mask(root / "ground_truth" / "crack_old" / "000_mask.png")
    (root / "ground_truth" / "notes.txt").write_text("about the masks")
    _save_mask(root / "ground_truth" / "Good" / "000_mask.png")
    (root / "ground_truth" / "ok").mkdir()  # an empty normal folder says nothing
    os.mkfifo(root / "train" / "good" / "camera.png")  # a pipe named like an image
    split = _load_naming_unread(
        root,
        [
            ("README.txt", "not an image extension"),
            ("batch2", "a folder: subfolders are not searched"),
            ("009.gif", "not an image extension"),
            ("gone.png", "a broken link"),
            ("camera.png", "not a regular file"),
            ("007_mask.png", "a mask with no test image"),
            ("train/loose.png", "only train/good is read"),
            ("good_batch2", "only train/good is read"),
            ("test/loose.png", "a file directly in test/"),
            ("crack_old", "masks of a type with no test/<type> folder"),
            ("notes.txt", "a file directly in ground_truth/"),
            ("ground_truth/Good", "masks of good images, which are all normal"),
        ],
    )
    assert len(split.train) == 5 and len(split.test) == 5  # what is read is unchanged


def test_load_mvtec_parent_with_categories(tmp_path):
    _make_mvtec(tmp_path / "bottle")
    _make_mvtec(tmp_path / "cable")
    with pytest.raises(DataError, match="several categories; found categories: bottle, cable"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, category="cable").root == tmp_path / "cable"
    with pytest.raises(DataError, match="No category 'screw'.*bottle, cable"):
        load_dataset(tmp_path, category="screw")
    with pytest.raises(DataError, match="already a single category"):
        load_dataset(tmp_path / "bottle", category="cable")


def test_load_btad_names(tmp_path):
    _save_rgb(tmp_path / "train" / "ok" / "0000.bmp")
    _save_rgb(tmp_path / "test" / "ok" / "0001.bmp")
    _save_rgb(tmp_path / "test" / "ko" / "0002.bmp")
    _save_mask(tmp_path / "ground_truth" / "ko" / "0002.png")
    split = load_dataset(tmp_path)
    assert [(s.label, s.mask_path) for s in split.test] == [
        (1, tmp_path / "ground_truth" / "ko" / "0002.png"),
        (0, None),
    ]


def test_load_mvtec_misnamed_folder(tmp_path):
    _save_rgb(tmp_path / "train" / "normal" / "0.png")
    (tmp_path / "test").mkdir()
    message = f"No 'train/good' in {tmp_path}; found: test, train/normal. flawscope expects the MVTec AD layout"
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(tmp_path)


def test_load_mvtec_empty_train_good(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "README").write_text("x")
    with pytest.raises(DataError, match=r"No images in .*train/good \(found: README\)"):
        load_dataset(tmp_path)


def test_load_mvtec_missing_mask_names_expected_path(tmp_path):
    root = _make_mvtec(tmp_path)
    (root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    expected = root / "ground_truth" / "scratch" / "000_mask.png"
    with pytest.raises(DataError, match=re.escape(f"has no mask: expected {expected}")):
        load_dataset(root)


def test_wrong_size_mask_fails_when_loading_the_item(tmp_path):
    root = _make_mvtec(tmp_path)
    _save_mask(root / "ground_truth" / "crack" / "000_mask.png", 12, 16)
    dataset = ImageDataset(load_dataset(root).test, image_size=16)
    with pytest.raises(DataError, match=r"000_mask\.png is 12x16 .* its image .*crack/000\.png is 24x32"):
        dataset[0]


def test_a_plain_folder_is_read_as_good_training_images_and_nothing_below_it(tmp_path):
    root = tmp_path / "parts"
    paths = [_save_rgb(root / name) for name in ("b.png", "A.JPG", "c.bmp")]
    _save_rgb(root / "rejects" / "000.png")  # e.g. defective parts kept next to the good ones: never trained on
    (root / "notes.txt").write_text("shift 2")
    (root / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="2 entries") as caught:
        split = load_dataset(root)
    message = str(caught[0].message)
    assert "rejects (a folder: subfolders are not searched)" in message and "notes.txt (not an image" in message
    assert split.layout == "folder" and split.category == "parts" and split.test == []
    assert [s.path for s in split.train] == sorted(paths, key=Path.as_posix)  # "A.JPG" < "b.png" < "c.bmp"
    assert all(s.label == 0 and s.mask_path is None for s in split.train)
    assert list_categories(root) == ["parts"]
    assert load_dataset(root, category="parts").train == split.train  # a run's recorded category reads it back
    with pytest.raises(DataError, match="plain folder of good images, which has no categories"):
        load_dataset(root, category="screw")


def test_auto_reads_a_folder_with_mvtec_visa_or_category_folders_as_those_and_never_as_plain(tmp_path):
    mvtec = _make_mvtec(tmp_path / "bottle")
    _save_rgb(mvtec / "loose.png")  # a stray image beside train/ does not make it a plain folder, and is named
    with pytest.warns(UserWarning, match=r"loose\.png \(an image directly in the data folder"):
        assert load_dataset(mvtec).layout == "mvtec"
    _save_rgb(tmp_path / "loose.png")  # the parent of a category folder
    assert load_dataset(tmp_path).root == mvtec
    visa = _make_visa(tmp_path / "visa")
    _save_rgb(visa / "loose.png")
    assert load_dataset(visa, category="candle").layout == "visa"
    assert load_dataset(mvtec / "train" / "good").layout == "folder"  # any folder of images, named directly
    assert len(load_dataset(mvtec, layout="folder").train) == 1  # asked for: the one image directly in it


def test_a_plain_folder_without_images_names_the_subfolders_that_hold_some(tmp_path):
    _save_rgb(tmp_path / "parts" / "good" / "0.png")
    (tmp_path / "parts" / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"No images directly in .*parts .*subfolder\(s\) .*parts/good: pass the folder"
    ):
        load_dataset(tmp_path / "parts", layout="folder")
    with pytest.raises(DataError, match=r"No 'train/good' .*if one of .*parts/good holds only good images, pass it"):
        load_dataset(tmp_path / "parts")  # auto: no images directly in it, so not a plain folder
    _save_rgb(tmp_path / "parts" / "1.png")
    (tmp_path / "parts" / "train").mkdir()  # images directly in it, but a train/ folder: auto reads it as MVTec
    with pytest.raises(DataError, match=r"directly in .*parts are not read .* also has train/: pass --layout folder"):
        load_dataset(tmp_path / "parts")
    with pytest.raises(ConfigError, match="expected one of: auto, mvtec, visa, folder"):
        load_dataset(tmp_path, layout="plain")


def test_mvtec_ad_2_reads_its_labelled_test_public_split(tmp_path):
    root = tmp_path / "can"  # MVTec AD 2: test_public/ with its own ground_truth/, unlabelled test_private/
    _save_rgb(root / "train" / "good" / "000_regular.png")
    _save_rgb(root / "validation" / "good" / "000_regular.png")
    _save_rgb(root / "test_public" / "good" / "000_regular.png")
    _save_rgb(root / "test_public" / "bad" / "000_regular.png")
    mask = _save_mask(root / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png")
    _save_rgb(root / "test_private" / "000_regular.png")
    split = load_dataset(root)
    assert [(s.path.relative_to(root).as_posix(), s.label, s.mask_path) for s in split.test] == [
        ("test_public/bad/000_regular.png", 1, mask),
        ("test_public/good/000_regular.png", 0, None),
    ]
    assert load_dataset(root, need_train=False).test == split.test
    assert [s.path for s in load_anomaly_folder(root)] == [split.test[0].path]  # --anomaly-dir CATEGORY
    _save_mask(root / "ground_truth" / "bad" / "000_regular_mask.png")  # masks where MVTec AD keeps them
    with pytest.warns(UserWarning, match=r"can/ground_truth \(masks beside test_public/, whose masks go in"):
        load_dataset(root)
    shutil.rmtree(root / "ground_truth")
    _save_rgb(root / "test" / "good" / "000.png")  # an MVTec AD test/ folder wins, and test_public/ is named
    with pytest.warns(UserWarning, match=r"can/test_public \(MVTec AD 2's test split, not read beside test/\)"):
        assert [s.path.parent.name for s in load_dataset(root).test] == ["good"]
    shutil.rmtree(root / "test")
    mask.unlink()
    with pytest.raises(DataError, match=r"has no mask: expected .*test_public/ground_truth/bad/000_regular_mask\.png"):
        load_dataset(root)


def test_mvtec_loco_masks_are_the_union_of_a_folder_per_image(tmp_path):
    root = tmp_path / "pushpins"  # MVTec LOCO: a folder of masks per defective image, one mask per defect
    _save_rgb(root / "train" / "good" / "000.png")
    _save_rgb(root / "validation" / "good" / "000.png")
    _save_rgb(root / "test" / "good" / "000.png")
    _save_rgb(root / "test" / "logical_anomalies" / "000.png")
    _save_rgb(root / "test" / "structural_anomalies" / "000.png")
    first, second = np.zeros((24, 32), np.uint8), np.zeros((24, 32), np.uint8)
    first[2:5, 3:9], second[10:20, 20:30] = 241, 255  # LOCO marks each defect type with its own value
    folder = root / "ground_truth" / "logical_anomalies" / "000"
    folder.mkdir(parents=True)
    Image.fromarray(first).save(folder / "000.png")
    Image.fromarray(second).save(folder / "001.png")
    _save_mask(root / "ground_truth" / "structural_anomalies" / "000" / "000.png")
    split = load_dataset(root)
    logical = next(s for s in split.test if s.defect_type == "logical_anomalies")
    assert logical.mask_path == folder
    assert np.array_equal(read_mask(logical.mask_path, size=(24, 32)), (first > 0) | (second > 0))
    assert np.array_equal(read_mask(folder / "001.png"), second > 0)  # a file is read as before
    Image.fromarray(np.zeros((24, 31), np.uint8)).save(folder / "002.png")
    with pytest.raises(DataError, match=r"Mask .*002\.png is 24x31 .* but the expected size is 24x32"):
        read_mask(folder)
    (folder / "002.png").unlink()
    (root / "ground_truth" / "logical_anomalies" / "007").mkdir()  # masks of no image are named, not read
    (folder / "notes.txt").write_text("annotator: A")
    _save_mask(folder / "extra" / "000.png")
    _save_mask(root / "ground_truth" / "structural_anomalies" / "000_mask.png")  # a file is read before a folder
    split = _load_naming_unread(
        root,
        [
            ("logical_anomalies/007", "a mask with no test image of its name"),
            ("000/notes.txt", "not an image extension"),
            ("000/extra", "a folder: subfolders are not searched"),
            ("structural_anomalies/000", "masks of an image whose mask file is read instead"),
        ],
    )
    assert next(s for s in split.test if s.defect_type == "structural_anomalies").mask_path.name == "000_mask.png"
    for path in folder.glob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match=r"Mask folder .*000 of the defective test image .*000\.png holds no mask"):
        load_dataset(root)  # when the data are listed, before any image is scored
    with pytest.raises(DataError, match=r"Mask folder .*000 holds no mask image"):
        read_mask(folder)


def _make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            image = _save_rgb(root / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG")
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{image.relative_to(root)},")
        image = _save_rgb(root / obj / "Data" / "Images" / "Anomaly" / "000.JPG")
        mask = _save_mask(root / obj / "Data" / "Masks" / "Anomaly" / "000.png")
        rows.append(f"{obj},test,anomaly,{image.relative_to(root)},{mask.relative_to(root)}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_load_visa_csv(tmp_path):
    root = _make_visa(tmp_path)
    split = load_dataset(root, category="pcb1")
    assert split.layout == "visa"
    assert [s.path.name for s in split.train] == ["0000.JPG", "0001.JPG"]
    assert [(s.label, s.path.parent.name) for s in split.test] == [(1, "Anomaly"), (0, "Normal")]
    assert split.test[0].mask_path == root / "pcb1" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert split.category == "pcb1"
    with pytest.raises(DataError, match="holds several objects; found objects: candle, pcb1"):
        load_dataset(root)


def test_a_run_tested_on_a_split_without_test_images_is_told_where_they_belong(tmp_path):
    from flawscope.run_data import run_dataset

    root = _make_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text("".join(line for line in csv_path.open() if ",test," not in line))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"category": "candle"}')
    with pytest.raises(DataError, match=r"no 'test' rows for 'candle' in .*1cls\.csv: `flawscope test` reads"):
        run_dataset(run, root)
    mvtec = _make_mvtec(tmp_path / "bottle")
    shutil.rmtree(mvtec / "test")
    shutil.rmtree(mvtec / "ground_truth")
    with pytest.raises(DataError, match=r"`flawscope calibrate` reads its test split .*train/ is not read.*synth"):
        run_dataset(run, mvtec, calibrating=True)
    with pytest.raises(
        DataError, match=r"a plain folder of images, .*no labels.*`flawscope predict RUN .*good --out DIR`"
    ):
        run_dataset(run, mvtec / "train" / "good")


def test_visa_rows_listing_an_image_twice_are_refused_and_object_names_trimmed(tmp_path):
    root = _make_visa(tmp_path)
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines, " " + lines[1].replace(",", " ,", 1)]) + "\n")
    assert list_categories(root) == ["candle", "pcb1"]  # " candle " is candle
    with pytest.raises(DataError, match=r"1cls\.csv, lines 2 and 10: the image .*0000\.JPG is listed twice"):
        load_dataset(root, category="candle")
    leak = lines[1].replace(",train,", ",test,")  # a training image also in the test split
    csv_path.write_text("\n".join([*lines, leak]) + "\n")
    with pytest.raises(DataError, match="lines 2 and 10: .* listed twice"):
        load_dataset(root, category="candle")
    # The same file written another way: absolute, or through '..'.
    _, _, _, image, _ = (field.strip() for field in lines[1].split(","))
    for other in (str(root / image), image.replace("/", "/../" + image.split("/")[0] + "/", 1)):
        row = lines[1].replace(",train,", ",test,").replace(image, other)
        csv_path.write_text("\n".join([*lines, row]) + "\n")
        with pytest.raises(DataError, match="lines 2 and 10: .* listed twice"):
            load_dataset(root, category="candle")


def test_list_categories_names_what_category_accepts(tmp_path, monkeypatch):
    _make_mvtec(tmp_path / "mv" / "bottle")
    _make_mvtec(tmp_path / "mv" / "cable")
    (tmp_path / "mv" / "notes").mkdir()
    assert list_categories(tmp_path / "mv") == ["bottle", "cable"]
    assert list_categories(tmp_path / "mv" / "cable") == ["cable"]
    assert load_dataset(tmp_path / "mv", category="cable").category == "cable"
    assert load_dataset(tmp_path / "mv" / "cable").category == "cable"
    assert list_categories(_make_visa(tmp_path / "visa")) == ["candle", "pcb1"]
    monkeypatch.chdir(tmp_path / "mv" / "cable")  # the folder's own name, not "." or ""
    assert list_categories(".") == ["cable"] and load_dataset(".", category="cable").category == "cable"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="No 'train/good'"):
        list_categories(tmp_path / "mv" / "notes")
    with pytest.raises(DataError, match=r"split_csv/1cls\.csv exists: for the VisA layout use layout='visa'"):
        load_dataset(tmp_path / "visa", layout="mvtec")


def test_load_visa_bad_rows(tmp_path):
    root = _make_visa(tmp_path)
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("test,anomaly", "test,defect", 1))
    with pytest.raises(DataError, match=r"1cls\.csv, line 5: got split 'test' with label 'defect'"):
        load_dataset(root, category="candle")
    csv_path.write_text("object,split,image\ncandle,train,a.png\n")
    with pytest.raises(DataError, match="lacks the column\\(s\\) label, mask"):
        load_dataset(root, layout="visa", category="candle")
    csv_path.write_text("object,split,label,image,mask\ncandle,train,normal,a.png,\ncandle,train\n")
    with pytest.raises(DataError, match=r"1cls\.csv, line 3: missing columns label, image;"):
        load_dataset(root, layout="visa", category="candle")


def test_load_visa_csv_not_utf8(tmp_path):
    root = _make_visa(tmp_path)
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text(), encoding="utf-16")  # with a BOM, as Excel's "Unicode text" writes
    with pytest.raises(DataError, match=r"1cls\.csv is not UTF-8 text .*save it as UTF-8 CSV"):
        load_dataset(root, category="candle")


def test_loading_never_modifies_the_data_folder(tmp_path):
    root = _make_mvtec(tmp_path / "bottle")
    before = _snapshot(root)
    split = load_dataset(root)
    for _ in make_loader(split.train + split.test, image_size=16, resize_size=20, batch_size=3):
        pass
    find_images([root])
    assert _snapshot(root) == before


@pytest.mark.real_data
@pytest.mark.skipif(not MTD.is_dir(), reason="../shared/datasets/mtd is absent")
def test_load_real_mtd():
    split = load_dataset(MTD)
    assert (len(split.train), len(split.test)) == (700, 644)
    assert sum(s.label == 0 for s in split.test) == 252
    assert {s.defect_type for s in split.test} == {"blowhole", "break", "crack", "fray", "good", "uneven"}


# --- find_images / split_validation ----------------------------------------------------------------------------------


def test_find_images_folders_globs_files(tmp_path):
    root = _make_mvtec(tmp_path)
    _save_rgb(root / ".cache" / "copy.png")
    with pytest.warns(UserWarning, match="ground_truth/ folders"):
        found = find_images([root])
    assert len(found) == 5 + 5 and found == sorted(found)  # train + test; masks, junk and hidden skipped
    assert find_images(str(root / "test" / "*" / "00[0].png")) == sorted(root.glob("test/*/000.png"))
    single = root / "test" / "good" / "000.png"
    assert find_images([single, single]) == [single]


def test_find_images_names_image_formats_it_passes_over(tmp_path):
    _save_rgb(tmp_path / "line" / "000.png")
    for name in ("anim.gif", "sub/shot.HEIC", ".cache/copy.gif", "notes.txt"):
        (tmp_path / "line" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "line" / name).write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"2 file\(s\) in a format flawscope does not read \(\.gif, \.heic\)"):
        assert find_images([tmp_path / "line"]) == [tmp_path / "line" / "000.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text file, a hidden copy: nothing to say
        (tmp_path / "line" / "anim.gif").unlink()
        (tmp_path / "line" / "sub" / "shot.HEIC").unlink()
        assert find_images([tmp_path / "line"]) == [tmp_path / "line" / "000.png"]


def test_find_images_leaves_a_data_sets_masks_out_unless_their_folder_is_named(tmp_path):
    root = _make_mvtec(tmp_path / "bottle")
    masks = sorted((root / "ground_truth").rglob("*.png"))
    assert masks
    with pytest.warns(UserWarning, match=rf"{len(masks)} image\(s\) under .* ground_truth/ folders"):
        found = find_images([root])
    assert not set(found) & set(masks) and len(found) == len(load_dataset(root).train) + len(load_dataset(root).test)
    assert find_images([root / "ground_truth"]) == masks  # named: read whole


def test_find_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"No images found in: .*empty, .*\*\.jpg"):
        find_images([tmp_path / "empty", tmp_path / "*.jpg"])
    with pytest.raises(DataError, match=r"notes\.txt is not an image file"):
        find_images([tmp_path / "notes.txt"])
    with pytest.raises(DataError, match=r"nope does not exist"):
        find_images([tmp_path / "nope"])
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match=r"pipe is not a regular file"):
        find_images([tmp_path / "pipe"])


def test_split_validation_is_seeded_disjoint_and_ordered():
    samples = [Sample(Path(f"{i:02d}.png")) for i in range(20)]
    train, val = split_validation(samples, ratio=0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert sorted(train + val, key=lambda s: s.path) == samples
    assert train == sorted(train, key=lambda s: s.path) and val == sorted(val, key=lambda s: s.path)
    assert split_validation(samples, ratio=0.1, seed=3) == (train, val)
    assert split_validation(samples, ratio=0.1, seed=4)[1] != val
    assert split_validation(samples, ratio=0.0) == (samples, [])
    assert len(split_validation(samples[:3], ratio=0.01)[1]) == 1  # a positive ratio holds out at least min_count


def test_split_validation_errors():
    samples = [Sample(Path(f"{i}.png")) for i in range(3)]
    for ratio in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
            split_validation(samples, ratio=ratio)
    with pytest.raises(DataError, match="Only 3 training image"):
        split_validation(samples, ratio=0.5, min_count=2)


# --- preprocessing and the torch dataset -----------------------------------------------------------------------------


def test_preprocess_resizes_shorter_side_and_centre_crops():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255  # left half black, right half white: a centred crop keeps them symmetric
    tensor = preprocess(image, image_size=16, resize_size=20)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    row = tensor[0, 0]
    assert row[0] == 0 and row[-1] == 1
    assert torch.allclose(row + row.flip(0), torch.ones(16))  # the edge (blurred by antialiasing) is centred
    with pytest.raises(ConfigError, match="resize_size 0 or >= image_size"):
        preprocess(image, image_size=16, resize_size=8)
    with pytest.raises(DataError, match=r"\(H, W, 3\) uint8"):
        preprocess(image.astype(np.float32), image_size=16)
    with pytest.raises(DataError, match=r"\(H, W, 3\) uint8"):
        preprocess(image[:, :, :2], image_size=16)


def test_mask_stays_aligned_with_its_image():
    mask = np.zeros((50, 70), bool)
    mask[13:29, 21:44] = True
    image = np.repeat(mask[:, :, None] * np.uint8(255), 3, axis=2)
    for resize_size in (24, 31):
        soft_image = preprocess(image, image_size=24, resize_size=resize_size)
        hard_mask = preprocess_mask(mask, image_size=24, resize_size=resize_size)
        assert hard_mask.shape == (1, 24, 24) and set(hard_mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(hard_mask[0], (soft_image[0] > 0.5).float())


def test_dataset_items_and_batches(tmp_path):
    split = load_dataset(_make_mvtec(tmp_path))
    dataset = ImageDataset(split.test, image_size=16, resize_size=20)
    item = dataset[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert item["label"] == 1 and item["index"] == 0 and item["mask"].sum() > 0
    assert dataset[2]["mask"].sum() == 0  # test/good: all-zero mask
    batch = next(iter(make_loader(split.test, 16, 20, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["label"].tolist() == [1, 1, 0, 0] and batch["index"].tolist() == [0, 1, 2, 3]


def test_shuffle_is_seeded(tmp_path):
    samples = load_dataset(_make_mvtec(tmp_path)).test

    def order(seed):
        return torch.cat([b["index"] for b in make_loader(samples, 8, batch_size=2, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1) and sorted(order(1)) == list(range(5))
    assert order(1) != list(range(5)) and order(2) != order(1)  # shuffled, and the seed matters


def test_skip_bad_records_files_instead_of_raising(tmp_path):
    good = _save_rgb(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    samples = [Sample(good), Sample(tmp_path / "bad.png"), Sample(good)]
    loader = make_loader(samples, image_size=8, batch_size=3, skip_bad=True)
    for _ in range(2):  # two epochs must not list the bad file twice
        batches = list(loader)
    assert batches[0]["index"].tolist() == [0, 2]
    assert [(path.name, "not an image format" in reason) for path, reason in loader.dataset.bad_files] == [
        ("bad.png", True)
    ]
    assert collate([None, None]) is None
    with pytest.raises(DataError, match=r"bad\.png"):
        list(make_loader(samples, image_size=8))
    with pytest.raises(ConfigError, match="num_workers=0"):
        make_loader(samples, image_size=8, skip_bad=True, num_workers=2)


def test_preprocess_resize_zero_keeps_the_whole_image():
    # A wide image with a bright right edge: a centre crop would cut it off, resize_size=0 keeps it.
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, -6:] = 255
    squashed = preprocess(image, 16, 0)
    cropped = preprocess(image, 16, 16)
    assert squashed.shape == cropped.shape == (3, 16, 16)
    assert squashed[:, :, -1].min() > 0.9 and cropped[:, :, -1].max() == 0


def _resize_then_crop(tensor: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """The resize-and-crop written out directly: the whole image resized, then the centre cut."""
    height, width = tensor.shape[-2:]
    shape = (resize, int(resize * width / height)) if height <= width else (int(resize * height / width), resize)
    resized = torch.nn.functional.interpolate(
        tensor[None], size=shape, mode="bilinear", align_corners=False, antialias=True
    )[0]
    top, left = int(round((shape[0] - size) / 2.0)), int(round((shape[1] - size) / 2.0))
    return resized[:, top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(3, 20, 320), (3, 320, 20), (3, 64, 1000)])
def test_resize_crop_up_to_the_aspect_limit_is_the_direct_computation(shape):
    from flawscope.data.dataset import _resize_crop

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_resize_crop(x, 64, 72), _resize_then_crop(x, 64, 72))


@pytest.mark.parametrize("shape", [(3, 40, 4000), (3, 4000, 40)])
def test_very_elongated_images_keep_their_centre_before_resizing(shape):
    from flawscope.data.dataset import MAX_CROP_ASPECT, _resize_crop

    # A smooth image: the central trim may shift the sampling grid by a fraction of a pixel, nothing more.
    ramp = torch.linspace(0, 1, max(shape[1:]))
    x = (ramp[:, None] if shape[1] > shape[2] else ramp[None, :]).expand(*shape[1:]).expand(3, -1, -1).contiguous()
    assert max(shape[1:]) > MAX_CROP_ASPECT * min(shape[1:])
    out = _resize_crop(x, 64, 72)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, _resize_then_crop(x, 64, 72), atol=1e-3)


def test_a_one_pixel_strip_is_preprocessed_without_a_huge_intermediate():
    # Resizing this 1 x 30000 strip whole to a shorter side of 256 would take 7.7 M x 256 x 3 floats (about 24 GB).
    out = preprocess(np.zeros((1, 30000, 3), np.uint8), 224, 256)
    assert out.shape == (3, 224, 224)


# --- data prepared on other systems -----------------------------------------------------------------------------------


def test_folder_names_match_in_any_case_and_masks_in_any_unicode_form(tmp_path):
    root = _make_mvtec(tmp_path / "cat")
    (root / "train" / "good").rename(root / "train" / "Good")
    (root / "test" / "good").rename(root / "test" / "OK")
    # macOS stores "é" decomposed (e + combining accent); the image name here is composed.
    _save_rgb(root / "test" / "crack" / "d\u00e9faut.png")
    _save_mask(root / "ground_truth" / "crack" / "de\u0301faut_mask.png")
    split = load_dataset(root)
    assert len(split.train) == 5
    assert sorted((s.label, s.defect_type) for s in split.test) == [(0, "good")] * 2 + [(1, "crack")] * 3 + [
        (1, "scratch")
    ]
    accented = next(s for s in split.test if s.path.name == "d\u00e9faut.png")
    assert accented.mask_path.name == "de\u0301faut_mask.png"


def test_lists_are_sorted_by_characters_not_by_the_systems_path_order(tmp_path):
    for name in ("b.png", "A.png", "a.png", "B.png"):
        _save_rgb(tmp_path / "train" / "good" / name)
    _save_rgb(tmp_path / "test" / "good" / "x.png")
    # Windows' Path order ignores case (A, a, B, b); the characters' order is the same on every system.
    assert [s.path.name for s in load_dataset(tmp_path).train] == ["A.png", "B.png", "a.png", "b.png"]
    assert [p.name for p in find_images(tmp_path / "train")] == ["A.png", "B.png", "a.png", "b.png"]


def test_a_test_set_without_ground_truth_folder_has_image_labels_only(tmp_path):
    root = _make_mvtec(tmp_path)
    shutil.rmtree(root / "ground_truth")
    defective = [s for s in load_dataset(root).test if s.label == 1]
    assert len(defective) == 3 and all(s.mask_path is None for s in defective)
    item = ImageDataset(defective, 16)[0]
    assert item["mask"].sum() == 0 and item["size"] == (24, 32)
    (root / "ground_truth" / "crack").mkdir(parents=True)  # with the folder, a missing mask is a mistake again
    with pytest.raises(DataError, match="has no mask"):
        load_dataset(root)


def test_visa_csv_from_a_spreadsheet_on_windows(tmp_path):
    root = _make_visa(tmp_path)
    csv_path = root / "split_csv" / "1cls.csv"
    header, *rows = csv_path.read_text().splitlines()
    # Capitalised, padded column names; backslash separators; the empty rows a spreadsheet leaves below the table.
    rows = [row.replace("/", "\\") for row in rows]
    csv_path.write_text("\r\n".join(["Object, Split ,Label,IMAGE,Mask", *rows, ",,,,", ",,,,"]) + "\r\n")
    split = load_dataset(root, category="candle")
    assert [s.path for s in split.train] == [root / "candle/Data/Images/Normal" / f"{i:04d}.JPG" for i in range(2)]
    assert split.test[0].mask_path == root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    csv_path.write_text("\n".join([header, *rows]).replace("0000.JPG", "0000.jpg") + "\n")
    with pytest.raises(DataError, match=r"0000\.jpg does not exist \(0000\.JPG exists there: names are case-sens"):
        load_dataset(root, category="candle")
    csv_path.write_text("\n".join(line.replace(",", ";") for line in [header, *rows]) + "\n")
    with pytest.raises(DataError, match="separated by ';': save it with commas"):
        load_dataset(root, category="candle")


def test_find_images_reads_a_path_once_and_expands_the_home_folder(tmp_path, monkeypatch):
    image = _save_rgb(tmp_path / "imgs" / "x.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_images(["imgs/x.png", image, "imgs", "./imgs/x.png"]) == [Path("imgs/x.png")]  # the first spelling
    assert find_images("~/imgs") == [image]
    with pytest.raises(DataError, match=r"'\*\.png' does not find 'a\.PNG'"):
        find_images("imgs/*.PNG")


def test_the_pixel_limit_travels_with_a_dataset_into_spawned_workers(monkeypatch):
    dataset = ImageDataset([], 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1234)
    payload = pickle.dumps(dataset)  # what a spawned DataLoader worker receives
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 99)  # a fresh process: the limit at import
    copy = pickle.loads(payload)
    assert Image.MAX_IMAGE_PIXELS == 1234 and copy.image_size == 16 and "_pixel_limit" not in vars(copy)


def test_only_the_listed_image_formats_are_decoded_whatever_the_content(tmp_path):
    # Pillow guesses a format from the content, and for PostScript it would run Ghostscript on a stranger's file.
    fake = tmp_path / "part.png"
    fake.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DataError, match="not an image format flawscope can decode"):
        read_image(fake)
    gif = tmp_path / "anim.png"
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    with pytest.raises(DataError, match="not an image format"):
        read_image(gif)
    mpo = tmp_path / "camera.jpg"  # many cameras write multi-picture JPEGs
    Image.new("RGB", (4, 3), (10, 20, 30)).save(mpo, "MPO")
    assert read_image(mpo).shape == (3, 4, 3)
