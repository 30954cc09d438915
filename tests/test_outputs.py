"""Tests of flawscope.outputs: what an output folder's manifest lets a command overwrite, and which images a search
leaves out. Pure file-system logic; the commands' use of it is tested end to end in test_cli.py."""

import json
from pathlib import Path

import pytest

from flawscope.errors import ConfigError
from flawscope.outputs import (
    OUTPUT_MARKER,
    check_out_folder,
    claim_out_folder,
    drop_output_images,
    is_output_image,
    owned_names,
)


def _files(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


def test_a_name_is_overwritten_only_when_the_manifest_lists_it(tmp_path):
    _files(tmp_path, "report.html", "notes.txt")
    check_out_folder(tmp_path, ["metrics.json"])  # nothing there under that name
    with pytest.raises(ConfigError, match=r"already holds report\.html.*has no \.flawscope file.*never overwrites"):
        check_out_folder(tmp_path, ["metrics.json", "report.html"])
    claim_out_folder(tmp_path, ["metrics.json"])
    assert owned_names(tmp_path) == {"metrics.json"}  # listed before it is written: the command writes it next
    _files(tmp_path, "metrics.json")
    check_out_folder(tmp_path, ["metrics.json"])
    with pytest.raises(ConfigError, match=r"report\.html.*does not list them"):
        check_out_folder(tmp_path, ["metrics.json", "report.html"])


def test_claiming_drops_names_whose_files_are_gone(tmp_path):
    claim_out_folder(tmp_path, ["a.json", "b.json"])
    _files(tmp_path, "a.json")
    claim_out_folder(tmp_path, ["c.json"])
    assert owned_names(tmp_path) == {"a.json", "c.json"}  # b.json was never written: the user may use the name


@pytest.mark.parametrize(
    "content",
    [
        '{"written_by": "flawscope", "written": 5}',
        '{"written_by": "flawscope", "written": [1]}',
        '{"written": ["metrics.json"]}',  # another program's JSON file
        "[1]",
        "my notes",
    ],
)
def test_a_marker_that_is_not_flawscope_s_list_owns_nothing_and_is_never_replaced(tmp_path, content):
    _files(tmp_path, "metrics.json", "overlays/00000_a.png")
    (tmp_path / OUTPUT_MARKER).write_text(content)
    assert owned_names(tmp_path) == set()
    assert not is_output_image(tmp_path / "overlays" / "00000_a.png")  # a search does not fail on it
    for refuse in (lambda: check_out_folder(tmp_path, []), lambda: claim_out_folder(tmp_path, ["x.json"])):
        with pytest.raises(ConfigError, match=r"\.flawscope is not flawscope's list of what it wrote"):
            refuse()
    assert (tmp_path / OUTPUT_MARKER).read_text() == content


def test_a_marker_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / OUTPUT_MARKER).mkdir()
    with pytest.raises(ConfigError, match="is not flawscope's list"):
        claim_out_folder(tmp_path, ["metrics.json"])


def test_an_older_run_owns_its_standard_names_only_with_flawscope_s_model_json(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "model.json").write_text(json.dumps({"format": 1, "method": "patchcore"}))
    assert {"config.json", "report.html", "metrics.json", "export"} <= owned_names(tmp_path / "run")
    (tmp_path / "other" / "model").mkdir(parents=True)
    (tmp_path / "other" / "model" / "model.json").write_text('{"name": "a model of something else"}')
    assert owned_names(tmp_path / "other") == set()
    _files(tmp_path / "run", "config.json", "report.html")
    claim_out_folder(tmp_path / "run", ["fit_log.json"])  # the older run keeps what exists of its own
    assert owned_names(tmp_path / "run") == {"model", "config.json", "report.html", "fit_log.json"}


def test_searches_leave_out_listed_overlays_but_not_a_folder_the_user_names(tmp_path):
    line = tmp_path / "line"
    _files(line, "a.png", "overlays/00000_a.png", "masks/00000_a.png", "other/b.png")
    claim_out_folder(line, ["predictions.csv", "overlays"])  # masks/ is the user's: not listed
    found = sorted(line.rglob("*.png"))
    assert [is_output_image(p) for p in found] == [False, False, False, True]  # a, masks/, other/, overlays/
    with pytest.warns(UserWarning, match=r"1 image\(s\) under .* flawscope's own outputs"):
        kept = drop_output_images(found, line, top=line)
    assert kept == found[:3]
    assert not is_output_image(line / "overlays" / "00000_a.png", top=line / "overlays")  # named: read


def test_links_in_the_output_folder_are_never_written_through(tmp_path):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("mine")
    claim_out_folder(out, ["per_image.csv", "report.html"])  # flawscope's names, then replaced by links
    (out / "per_image.csv").symlink_to(victim)
    (out / "report.html").symlink_to(tmp_path / "not-there.html")  # dangling: exists() is False
    with pytest.raises(ConfigError, match=r"holds per_image\.csv, report\.html as a symbolic link"):
        check_out_folder(out, ["per_image.csv", "report.html"])
    with pytest.raises(ConfigError, match=r"holds report\.html as a symbolic link"):
        check_out_folder(out, ["report.html"])
    assert victim.read_text() == "mine" and not (tmp_path / "not-there.html").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.json").symlink_to(tmp_path / "gone.json")  # not flawscope's and dangling: still a clash
    with pytest.raises(ConfigError, match="symbolic link"):
        check_out_folder(fresh, ["metrics.json"])
