"""outputs.move_into_place, the one rename step behind atomic_directory and convert's outputs."""
from __future__ import annotations

import pytest

from adafuse_export.outputs import atomic_directory, move_into_place


def test_moves_in_order_and_keeps_what_was_replaced_in_trash(tmp_path):
    staged, trash = tmp_path / "staged", tmp_path / "trash"
    staged.mkdir()
    (staged / "a").write_text("new a")
    (staged / "d").mkdir()
    (staged / "d" / "f").write_text("new f")
    (tmp_path / "a.out").write_text("old a")
    move_into_place([(staged / "d", tmp_path / "d.out"), (staged / "a", tmp_path / "a.out")], trash)
    assert (tmp_path / "a.out").read_text() == "new a" and (tmp_path / "d.out" / "f").read_text() == "new f"
    assert [p.name for p in trash.iterdir()] == ["a.out"] and (trash / "a.out").read_text() == "old a"
    assert list(staged.iterdir()) == []


def test_no_trash_when_nothing_is_replaced(tmp_path):
    (tmp_path / "s").write_text("x")
    move_into_place([(tmp_path / "s", tmp_path / "out")], tmp_path / "trash")
    assert (tmp_path / "out").read_text() == "x" and not (tmp_path / "trash").exists()


def test_a_failed_move_stops_before_later_outputs(tmp_path):
    """The manifest goes last: when an earlier rename fails, it is not placed."""
    (tmp_path / "manifest").write_text("m")
    with pytest.raises(FileNotFoundError):
        move_into_place([(tmp_path / "missing", tmp_path / "x.onnx"), (tmp_path / "manifest", tmp_path / "x.json")],
                        tmp_path / "trash")
    assert not (tmp_path / "x.json").exists() and (tmp_path / "manifest").exists()


def test_atomic_directory_replaces_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
