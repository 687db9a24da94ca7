"""Files and directories that are never half-written: a failure leaves what was there."""

from __future__ import annotations

import json
import os
import stat

import pytest

from loralab.files.atomic_write import (
    json_writer,
    link_writer,
    text_writer,
    write_directory_atomically,
    write_files_atomically,
)


def test_files_are_written_together_or_not_at_all(tmp_path):
    (tmp_path / "config.json").write_text("old config")
    (tmp_path / "weights.bin").write_text("old weights")

    def fails(path: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_files_atomically(
            tmp_path, {"config.json": json_writer({"r": 8}), "weights.bin": fails}
        )
    assert (tmp_path / "config.json").read_text() == "old config"  # not a new config alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.bin"]
    write_files_atomically(
        tmp_path, {"config.json": json_writer({"r": 8}), "weights.bin": text_writer("new")}
    )
    assert json.loads((tmp_path / "config.json").read_text()) == {"r": 8}
    assert (tmp_path / "weights.bin").read_text() == "new"


def test_written_files_get_the_mode_a_plain_write_gives(tmp_path):
    write_files_atomically(tmp_path, {"a.txt": text_writer("a")})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask  # not 0600


def test_a_linked_file_is_the_source_itself(tmp_path):
    source = tmp_path / "base.gguf"
    source.write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    write_files_atomically(out, {"base.gguf": link_writer(source)})
    assert (out / "base.gguf").read_bytes() == b"GGUF"
    assert (out / "base.gguf").stat().st_ino == source.stat().st_ino  # no second copy


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "merged"

    def half_then_fail(directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_directory_atomically(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []  # no target, no scratch left behind
    target.mkdir()  # an empty target is replaced
    write_directory_atomically(target, lambda d: (d / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
