"""Output paths are checked before any slow work, and the check creates nothing."""

from __future__ import annotations

import os

import pytest

from loralab.files.output_dirs import OutputDirError, check_output_dir


def test_a_new_or_existing_writable_directory_passes_and_nothing_is_created(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", "--output-dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert check_output_dir(tmp_path, "--output-dir") == tmp_path


def test_each_refusal_names_the_flag_the_path_and_why(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputDirError, match=f"--output {file} is an existing file"):
        check_output_dir(file, "--output")
    with pytest.raises(OutputDirError, match=f"{file} is a file, so no directory can go"):
        check_output_dir(file / "below", "--output")
    full = tmp_path / "full"
    full.mkdir()
    (full / "kept").write_text("x")
    with pytest.raises(OutputDirError, match="not empty; name a new directory"):
        check_output_dir(full, "--output", empty=True)
    assert (full / "kept").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="is not writable"):
        check_output_dir(locked / "run", "--output-dir")
