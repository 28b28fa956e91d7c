from __future__ import annotations

import pytest

from scfm.errors import ScfmError
from scfm.utils import atomic_output


def test_atomic_output_renames_a_complete_file(tmp_path):
    target = tmp_path / "out" / "a.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_output_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "a.h5ad"
    with pytest.raises(ScfmError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise ScfmError("bad input", "x.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]


def test_errors_are_one_line_and_name_the_file():
    err = ScfmError("values are\nnegative", "/data/x.h5ad")
    assert str(err) == "/data/x.h5ad: values are negative"
