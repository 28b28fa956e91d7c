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


# -- output paths are checked before any work -------------------------------------------------------
from scfm.utils import check_output_path  # noqa: E402


def test_an_output_under_a_regular_file_is_refused_naming_the_output(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "sub" / "out.h5ad"
    with pytest.raises(ScfmError) as info:
        check_output_path(out)
    assert info.value.path == str(out)
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in info.value.message


def test_an_output_that_is_the_input_is_refused_under_any_spelling(tmp_path, monkeypatch):
    source = tmp_path / "data" / "cells.h5ad"
    source.parent.mkdir()
    source.write_text("x")
    (tmp_path / "link.h5ad").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for spelling in (source, "data/../data/cells.h5ad", "./data/cells.h5ad", tmp_path / "link.h5ad"):
        with pytest.raises(ScfmError, match="writing the output would destroy it"):
            check_output_path(spelling, inputs=[source])
    assert check_output_path(tmp_path / "other.h5ad", inputs=[source, None]) == tmp_path / "other.h5ad"


def test_a_replaced_folder_may_not_hold_an_input(tmp_path):
    inside = tmp_path / "run" / "models.ckpt"
    inside.parent.mkdir()
    inside.write_text("x")
    with pytest.raises(ScfmError, match="holds the input"):
        check_output_path(tmp_path / "run", inputs=[inside], directory=True)
    with pytest.raises(ScfmError, match="exists and is not a folder"):
        check_output_path(inside, directory=True)
    with pytest.raises(ScfmError, match="is a folder; give a file name"):
        check_output_path(tmp_path / "run")


def test_atomic_output_removes_the_folders_it_created_when_the_block_fails(tmp_path):
    target = tmp_path / "new" / "deeper" / "a.h5ad"
    with pytest.raises(ScfmError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise ScfmError("bad input", "x.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_under_a_regular_file_is_one_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ScfmError, match="cannot create the output's folder"):
        with atomic_output(tmp_path / "notes.txt" / "a.h5ad"):
            pass


# -- SIGTERM unwinds like Ctrl-C ---------------------------------------------------------------------
def test_sigterm_unwinds_through_atomic_outputs(tmp_path):
    import os
    import signal

    from scfm.errors import Terminated
    from scfm.utils import sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_unwinds(), atomic_output(tmp_path / "new" / "out.h5ad") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()  # never reached: the handler raises at the next bytecode
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_swallowed_in_a_finaliser_is_raised_again():
    """A SIGTERM whose handler ran inside a __del__ (Python ignores exceptions there) must still stop the step."""
    import gc
    import os
    import signal
    import time

    from scfm.errors import Terminated
    from scfm.utils import sigterm_unwinds

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside the finaliser

    with pytest.raises(Terminated):
        with sigterm_unwinds():
            SignalsWhenCollected()
            gc.collect()
            deadline = time.time() + 10
            while time.time() < deadline:
                sum(range(1000))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
