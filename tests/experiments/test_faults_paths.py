"""``expand_paths`` (--images, --tasks_from): existing paths taken literally, each file once (#31 §7)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from experiments.run.trained import expand_paths
from taps_lightning.errors import SettingsError

SUFFIXES = (".png",)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return path


@pytest.mark.parametrize("name", ["a[1].png", "b*.png", "what?.png", "[x]"])
def test_existing_path_with_glob_characters_is_taken_literally(tmp_path, name):
    target = _png(tmp_path / name / "in.png") if name == "[x]" else _png(tmp_path / name)
    _png(tmp_path / "a1.png")  # what a[1].png would match as a pattern
    _png(tmp_path / "bb.png")
    given = tmp_path / name
    assert expand_paths([str(given)], SUFFIXES, "--images") == [target]


def test_a_glob_still_expands(tmp_path):
    _png(tmp_path / "a1.png"), _png(tmp_path / "a2.png")
    assert [p.name for p in expand_paths([str(tmp_path / "a?.png")], SUFFIXES, "--images")] == ["a1.png", "a2.png"]


def test_symlink_loop_counts_each_image_once(tmp_path):
    d = tmp_path / "d"
    _png(d / "x.png"), _png(d / "sub" / "y.png")
    (d / "loop").symlink_to(".", target_is_directory=True)
    found = expand_paths([str(d / "**" / "*.png")], SUFFIXES, "--images")
    assert sorted(p.name for p in found) == ["x.png", "y.png"]
    assert expand_paths([str(d / "x.png"), str(d / "loop" / "x.png"), str(d)], SUFFIXES, "--images") == [d / "x.png"]


def test_missing_and_empty_are_typed_errors_naming_the_flag(tmp_path):
    with pytest.raises(SettingsError, match=r"--images: .*nope.png: no such file or folder"):
        expand_paths([str(tmp_path / "nope.png")], SUFFIXES, "--images")
    with pytest.raises(SettingsError, match=r"--images: .*: matches no .png file"):
        expand_paths([str(tmp_path / "*.png")], SUFFIXES, "--images")
