"""PRN's synthetic defects: Perlin masks, texture sources, homologous / extended anomalies, target areas."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope.data import Sample, crop_box, load_dataset, read_image, read_mask
from flawscope.errors import DataError
from flawscope.synthesis import (
    TARGET_SHAPES,
    FolderTextures,
    ProceduralTextures,
    blend,
    extended_anomaly,
    foreground_mask,
    grid_shuffle,
    homologous_source,
    match_grey,
    perlin_mask,
    perlin_noise,
    simulated_anomaly,
    target_area,
    write_synthetic_validation_set,
)

SIZE = 64


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (SIZE, SIZE, 3)).astype(np.float32)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(after - before).max(-1) > 0


def _object_image() -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark background, and the disc's mask."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    disc = (rows - 30) ** 2 + (cols - 34) ** 2 < 18**2
    image = np.where(disc[..., None], 0.8, 0.1).astype(np.float32)
    return image, disc


def _generators():
    """(name, function(rng, foreground) -> (before, after, mask)) for every generator."""
    image, other = _image(0), _image(1)
    defect_mask = np.zeros((SIZE, SIZE), bool)
    defect_mask[20:40, 25:35] = True

    def hea(rng, foreground):
        texture = ProceduralTextures()((SIZE, SIZE), rng)
        return (image, *simulated_anomaly(image, texture, rng, foreground))

    def hoa(rng, foreground):
        source = homologous_source(other, rng)
        return (image, *simulated_anomaly(image, source, rng, foreground, num_ops=0))

    def extended(rng, foreground):
        return (image, *extended_anomaly(image, other, defect_mask, rng, foreground))

    return [("hea", hea), ("hoa", hoa), ("extended", extended)]


@pytest.mark.parametrize(("name", "generate"), _generators())
def test_mask_is_exactly_the_changed_pixels(name, generate):
    rng = np.random.default_rng(3)
    non_empty = 0
    for _ in range(12):
        before, after, mask = generate(rng, None)
        assert after.shape == before.shape and after.dtype == np.float32 and mask.dtype == bool
        np.testing.assert_array_equal(_changed(before, after), mask)
        non_empty += bool(mask.any())
    assert non_empty >= 4, f"{name} produced almost only empty masks"


@pytest.mark.parametrize(("name", "generate"), _generators())
def test_generators_are_reproducible_from_their_seed(name, generate):
    a = generate(np.random.default_rng(11), None)
    b = generate(np.random.default_rng(11), None)
    c = generate(np.random.default_rng(12), None)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[1], c[1]) or not np.array_equal(a[2], c[2])


@pytest.mark.parametrize(("name", "generate"), _generators())
def test_generators_respect_the_foreground(name, generate):
    foreground = np.zeros((SIZE, SIZE), bool)
    foreground[8:40, 10:50] = True
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(12):
        before, after, mask = generate(rng, foreground)
        assert not (mask & ~foreground).any()
        assert not _changed(before, after)[~foreground].any()
        hits += bool(mask.any())
    assert hits >= 3


def test_extended_anomalies_keep_their_target_area(monkeypatch):
    # The paper draws one target area and redraws Aug_2 until the moved defect overlaps it; when the tries run out
    # a new area is centred on the moved defect, so the cut is never dropped.
    import flawscope.synthesis.anomalies as anomalies

    drawn = []

    def recording_area(shape, rng, foreground=None, shapes=TARGET_SHAPES):
        drawn.append(target_area(shape, rng, foreground, shapes))
        return drawn[-1]

    monkeypatch.setattr(anomalies, "target_area", recording_area)
    image, other = _image(0), _image(1)
    defect_mask = np.zeros((SIZE, SIZE), bool)
    defect_mask[20:40, 25:35] = True
    rng = np.random.default_rng(5)
    areas_per_sample = []
    for _ in range(40):
        drawn.clear()
        _, mask = extended_anomaly(image, other, defect_mask, rng)
        areas_per_sample.append(len(drawn))
        assert mask.any()
        assert not (mask & ~drawn[-1]).any()  # inside the (last) target area
    assert set(areas_per_sample) <= {1, 2}
    assert 1 in areas_per_sample


def test_one_simulated_draw_may_leave_a_normal_sample():
    image, texture = _image(0), _image(1)
    once = [simulated_anomaly(image, texture, np.random.default_rng(i), tries=1)[1].any() for i in range(40)]
    redrawn = [simulated_anomaly(image, texture, np.random.default_rng(i))[1].any() for i in range(40)]
    assert 5 <= once.count(False) <= 35  # the target area misses the Perlin mask in a good share of single draws
    assert redrawn.count(False) < once.count(False)


def test_generators_draw_only_the_allowed_target_shapes(monkeypatch):
    import flawscope.synthesis.anomalies as anomalies

    kinds = []

    def recording_area(shape, rng, foreground=None, shapes=()):
        area = target_area(shape, rng, foreground, shapes)
        kinds.append(tuple(shapes))
        return area

    monkeypatch.setattr(anomalies, "target_area", recording_area)
    image, other = _image(0), _image(1)
    defect_mask = np.zeros((SIZE, SIZE), bool)
    defect_mask[20:40, 25:35] = True
    rng = np.random.default_rng(0)
    extended_anomaly(image, other, defect_mask, rng, shapes=("circle",), affine=(0.0, 0.0, 0.0))
    simulated_anomaly(image, other, rng, shapes=("circle",))
    assert kinds and set(kinds) == {("circle",)}
    for seed in range(5):  # a rectangle fills its bounding box
        rows, cols = np.nonzero(target_area((SIZE, SIZE), np.random.default_rng(seed), shapes=("rectangle",)))
        assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    # With a zero affine range the defect stays where it was.
    _, mask = extended_anomaly(image, other, defect_mask, rng, use_target_area=False, affine=(0.0, 0.0, 0.0))
    np.testing.assert_array_equal(mask, defect_mask)


def test_solarize_inverts_above_its_threshold_in_half_of_the_draws():
    from flawscope.synthesis.augment import COLOUR_OPS

    image = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16, 1).repeat(3, axis=2)
    kept = 0
    for seed in range(400):
        out = COLOUR_OPS["solarize"](image, np.random.default_rng(seed))
        if np.array_equal(out, image):
            kept += 1
            continue
        inverted = ~np.isclose(out, image)
        threshold = image[inverted].min()  # imgaug's threshold lies in [32, 128] grey levels
        assert 32 / 255 - 1 / 255 <= threshold <= 128 / 255 + 1 / 255
        np.testing.assert_allclose(out[image >= threshold], 1 - image[image >= threshold], atol=1e-6)
        np.testing.assert_array_equal(out[image < threshold], image[image < threshold])
    assert 160 <= kept <= 240  # p = 0.5, as imgaug's Solarize(0.5)


def test_blend_formula_and_forced_change():
    image = np.full((4, 4, 3), 0.5, np.float32)
    source = np.full((4, 4, 3), 0.9, np.float32)
    source[0, 0] = 0.5  # equal to the good pixel: must still change
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    out = blend(image, source, mask, beta=0.25)
    np.testing.assert_allclose(out[1, 1], 0.75 * 0.9 + 0.25 * 0.5, rtol=1e-6)
    assert np.abs(out[0, 0] - 0.5).max() > 0
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_perlin_noise_is_zero_on_the_lattice_and_masks_are_reproducible():
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 64), (4, 4), rng)
    assert noise.shape == (64, 64)
    np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-12)
    assert noise.std() > 0.05
    assert perlin_noise((50, 70), (8, 2), rng).shape == (50, 70)
    a = perlin_mask((64, 64), np.random.default_rng(1))
    b = perlin_mask((64, 64), np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)


def test_grid_shuffle_permutes_whole_cells():
    image = np.arange(64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    shuffled = grid_shuffle(image, np.random.default_rng(0), grid=8)
    assert not np.array_equal(shuffled, image)
    cells = {image[r : r + 8, c : c + 8].tobytes() for r in range(0, 64, 8) for c in range(0, 64, 8)}
    moved = {shuffled[r : r + 8, c : c + 8].tobytes() for r in range(0, 64, 8) for c in range(0, 64, 8)}
    assert cells == moved


@pytest.mark.parametrize("kind", ["circle", "rectangle", "polygon"])
def test_target_area_is_centred_on_the_foreground(kind):
    foreground = np.zeros((SIZE, SIZE), bool)
    foreground[50:54, 5:9] = True
    rng = np.random.default_rng(0)
    for _ in range(10):
        area = target_area((SIZE, SIZE), rng, foreground, (kind,))
        assert area.any() and (area & foreground).any()


def test_foreground_mask_finds_an_object_on_a_plain_background():
    image, disc = _object_image()
    found = foreground_mask(image + np.random.default_rng(0).normal(0, 0.02, image.shape).astype(np.float32))
    iou = (found & disc).sum() / (found | disc).sum()
    assert iou > 0.9
    assert foreground_mask(np.full((SIZE, SIZE, 3), 0.5, np.float32)).all()


def test_texture_sources(tmp_path):
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    rng = np.random.default_rng(0)
    texture = FolderTextures(tmp_path)((SIZE, 48), rng)
    assert texture.shape == (SIZE, 48, 3) and texture.dtype == np.float32
    # One of the three files, resized whole (bilinear, no crop) and scaled to [0, 1].
    expected = [
        np.asarray(Image.open(tmp_path / f"{i}.png").resize((48, SIZE), Image.BILINEAR), np.float32) / 255.0
        for i in range(3)
    ]
    assert sum(np.array_equal(texture, e) for e in expected) == 1
    procedural = ProceduralTextures()((SIZE, SIZE), rng)
    assert procedural.shape == (SIZE, SIZE, 3) and procedural.max() == pytest.approx(1.0) and procedural.std() > 0.02


def test_synthetic_validation_set_layout_and_exact_masks(tmp_path):
    sources = tmp_path / "good"
    sources.mkdir()
    for i in range(6):
        Image.fromarray((_image(i) * 255).astype(np.uint8)).save(sources / f"{i}.png")
    out = tmp_path / "val"
    summary = write_synthetic_validation_set(sorted(sources.iterdir()), out, image_size=SIZE, resize_size=0, seed=0)
    assert summary["num_defects"] == 3 and summary["num_good"] == 3
    split = load_dataset(out)
    assert sum(s.label for s in split.test) == 3 and len(split.test) == 6
    for sample in (s for s in split.test if s.label):
        clean = read_image(out / "train" / "good" / sample.path.name).astype(int)
        defective = read_image(sample.path).astype(int)
        mask = read_mask(sample.mask_path)
        assert mask.any()
        np.testing.assert_array_equal(np.abs(defective - clean).max(-1) > 0, mask)
    with pytest.raises(DataError, match="exists and is not empty"):
        write_synthetic_validation_set(sorted(sources.iterdir()), out, image_size=SIZE)
    # Grey images get grey defects (as PRN's and MLFF's training defects), the masks still exact.
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(20):  # 10 defects: some texture blends, which are coloured on a colour image
        Image.fromarray((_image(i) * 255).astype(np.uint8)).convert("L").save(grey / f"{i}.png")
    write_synthetic_validation_set(sorted(grey.iterdir()), tmp_path / "grey-val", image_size=SIZE, resize_size=0)
    for sample in (s for s in load_dataset(tmp_path / "grey-val").test if s.label):
        defective = read_image(sample.path).astype(int)
        assert np.ptp(defective, axis=-1).max() == 0  # every pixel grey
        clean = read_image(tmp_path / "grey-val" / "train" / "good" / sample.path.name).astype(int)
        np.testing.assert_array_equal(np.abs(defective - clean).max(-1) > 0, read_mask(sample.mask_path))


def test_synthetic_validation_set_for_a_cropping_run_keeps_every_defect_inside_the_crop(tmp_path):
    """Written before the crop (resize 80, crop 64): the run's own preprocessing sees every defect, masks exact."""
    from flawscope.data import ImageDataset

    sources = tmp_path / "good"
    sources.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(90, 150), (150, 90), (100, 100), (70, 200)] * 3):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(sources / f"{i}.png")
    out = tmp_path / "val"
    write_synthetic_validation_set(sorted(sources.iterdir()), out, image_size=SIZE, resize_size=80, seed=0)
    split = load_dataset(out)
    defective = [s for s in split.test if s.label]
    assert len(defective) == 6
    for sample in defective:
        image, mask = read_image(sample.path), read_mask(sample.mask_path)
        assert min(image.shape[:2]) == 80 and mask.shape == image.shape[:2]  # resized, not cropped
        top, left = crop_box(*mask.shape, SIZE)
        assert mask[top : top + SIZE, left : left + SIZE].sum() == mask.sum() > 0  # the whole defect in the crop
    # Through the run's geometry: the clean twin differs exactly where the mask says, and no mask is empty.
    items = ImageDataset(defective, image_size=SIZE, resize_size=80)
    twins = ImageDataset(
        [Sample(out / "train" / "good" / s.path.name, 0) for s in defective], image_size=SIZE, resize_size=80
    )
    for item, twin in zip(items, twins, strict=True):
        assert item["mask"].sum() > 0
        changed = (item["image"] - twin["image"]).abs().amax(0) > 0
        assert torch.equal(changed, item["mask"][0].bool())


def test_synthetic_validation_set_uses_the_foreground_and_the_texture_folder(tmp_path, monkeypatch):
    import flawscope.synthesis.validation_set as validation_set

    sources, textures = tmp_path / "good", tmp_path / "textures"
    sources.mkdir()
    textures.mkdir()
    disc_image = np.repeat(_object_image()[0], 3, axis=2)
    rng = np.random.default_rng(0)
    for i in range(8):  # the disc with a little noise, so every copy differs
        noisy = np.clip(disc_image + rng.normal(0, 0.02, disc_image.shape), 0, 1)
        Image.fromarray((noisy * 255).astype(np.uint8)).save(sources / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(textures / f"{i}.png")
    asked = []
    original = validation_set.texture_source
    monkeypatch.setattr(validation_set, "texture_source", lambda folder: asked.append(folder) or original(folder))
    out = tmp_path / "val"
    summary = write_synthetic_validation_set(
        sorted(sources.iterdir()), out, image_size=SIZE, resize_size=0, texture_dir=textures, use_foreground=True
    )
    assert asked == [textures] and summary["textures"] == str(textures) and summary["use_foreground"]
    for sample in (s for s in load_dataset(out).test if s.label):
        clean = read_image(out / "train" / "good" / sample.path.name).astype(np.float32) / 255
        mask = read_mask(sample.mask_path)
        assert mask.any() and not (mask & ~foreground_mask(clean)).any()  # only on the disc


def test_synthetic_validation_set_keeps_sources_that_share_a_stem_and_leaves_nothing_on_failure(tmp_path):
    sources = tmp_path / "good"
    sources.mkdir()
    for i in range(3):
        for suffix in (".png", ".bmp"):  # 0.png and 0.bmp: the same stem
            Image.fromarray((_image(i) * 255).astype(np.uint8)).save(sources / f"{i}{suffix}")
    out = tmp_path / "val"
    summary = write_synthetic_validation_set(sorted(sources.iterdir()), out, image_size=SIZE, resize_size=0, seed=0)
    split = load_dataset(out)
    assert len(split.test) == 6 and summary["num_good"] + summary["num_defects"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "val"]  # no staging folder left

    (sources / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="1.png"):
        write_synthetic_validation_set(sorted(sources.iterdir()), tmp_path / "val2", image_size=SIZE, resize_size=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "val"]  # nothing partial: a retry can use val2

    # A staging folder left by a killed run does not block the next one; a user's file does.
    (sources / "1.png").write_bytes((sources / "1.bmp").read_bytes())
    (tmp_path / "val3" / ".partial-killed" / "test").mkdir(parents=True)
    write_synthetic_validation_set(sorted(sources.iterdir()), tmp_path / "val3", image_size=SIZE, resize_size=0)
    assert sorted(p.name for p in (tmp_path / "val3").iterdir()) == ["ground_truth", "synthetic.json", "test", "train"]
    (tmp_path / "val4" / ".partial-killed").mkdir(parents=True)
    (tmp_path / "val4" / "mine.txt").write_text("the user's")
    with pytest.raises(DataError, match="exists and is not empty"):
        write_synthetic_validation_set(sorted(sources.iterdir()), tmp_path / "val4", image_size=SIZE, resize_size=0)
    assert (tmp_path / "val4" / ".partial-killed").is_dir()


def test_cli_writes_a_synthetic_validation_set(tiny_dataset, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from flawscope.cli import main

    out = tmp_path / "synth"
    args = ["synth", "--data", str(tiny_dataset), "--out", str(out), "--image-size", "64", "--num-defects", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    split = load_dataset(out)
    assert sum(s.label for s in split.test) == 4 and len(split.test) == len(load_dataset(tiny_dataset).train)

    # --run: the run's held-out good images (which its model never saw), at the run's input size.
    import flawscope

    options = {"backbone": "efficientnet_lite0", "image_size": 48, "resize_size": 0}
    monkeypatch.chdir(tiny_dataset.parent)  # fitted on a relative path: the run must not depend on this folder
    run = flawscope.fit("patchcore", tiny_dataset.name, tmp_path / "run", options=options, val_ratio=0.25, quiet=True)
    monkeypatch.chdir(tmp_path)
    config = json.loads((run / "config.json").read_text())
    held_out = config["val_images"]
    assert Path(config["data"]) == tiny_dataset.resolve() and all(Path(p).is_absolute() for p in held_out)
    result = CliRunner().invoke(
        main, ["synth", "--data", str(tiny_dataset), "--out", str(tmp_path / "s2"), "--run", str(run)]
    )
    assert result.exit_code == 0, result.output
    written = load_dataset(tmp_path / "s2").test
    sources = sorted(s.path.stem.split("_", 1)[1] for s in written)  # every file is named NNNN_<stem>
    assert sources == sorted(Path(p).stem for p in held_out)
    assert all(read_image(s.path).shape == (48, 48, 3) for s in written)
    result = CliRunner().invoke(
        main, ["synth", "--data", str(tiny_dataset), "--out", str(tmp_path / "s3"), "--run", str(tmp_path)]
    )
    assert result.exit_code != 0 and "is not a run folder" in result.output and "Traceback" not in result.output


def test_match_grey_greys_a_defect_on_a_grey_image_and_keeps_the_mask_exact():
    image = np.repeat(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4, 1), 3, axis=2)
    image[1, 1] = 0.5
    new = image.copy()
    new[0, 0] = [0.9, 0.0, 0.0]  # coloured: mean 0.3
    new[1, 1] = [0.75, 0.25, 0.5]  # coloured with the good pixel's mean: unchanged once grey
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    grey, grey_mask = match_grey(image, new, mask)
    np.testing.assert_allclose(grey[0, 0], [0.3, 0.3, 0.3], atol=1e-6)
    assert grey_mask.tolist() == (grey != image).any(-1).tolist() and grey_mask[0, 0] and not grey_mask[1, 1]
    colour = np.random.default_rng(0).random((3, 4, 3), dtype=np.float32)
    same, same_mask = match_grey(colour, new, mask)
    assert same is new and same_mask is mask
    almost = image.copy()
    almost[2, 3, 1] += 0.4 / 255  # within half a grey level (e.g. a grey JPEG stored as RGB): still grey
    assert match_grey(almost, new, mask)[1][0, 0] and np.ptp(match_grey(almost, new, mask)[0][0, 0]) == 0
    with pytest.raises(TypeError, match="float"):
        match_grey((image * 255).astype(np.uint8), new, mask)
