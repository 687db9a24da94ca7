"""Reading an adapter a client names: once, from inside ``--adapter-dir``, from what was
checked.

A path from the network must never make the server read a file outside ``--adapter-dir``
(a symlink swapped in after a check), block on a FIFO or a device, or read without end.
So nothing is checked by name and read later: ``--adapter-dir`` is opened once at
start-up, and every directory and file below it is opened relative to that descriptor,
one path component at a time, none of them followed if it is a symlink (``O_NOFOLLOW``)
and none of them blocking (``O_NONBLOCK``: a FIFO opens at once instead of waiting for a
writer). What was opened is checked on its descriptor (``fstat``: a regular file, of a
bounded size) and read from that descriptor. Symlinks that stay inside ``--adapter-dir``
still work: they are resolved first, and the real path is then opened as above, so a link
swapped in afterwards makes the open fail instead of leading outside.

The reads run on a worker thread (``read`` blocks), and the caller abandons one that
stalls (a hung network file system) after a bound; the files' bytes are parsed and
checked here too, so that the engine's thread only ever sets tensors from memory.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes

from ..files.adapter_dir import LORALAB_FILE, WEIGHTS_FILE, AdapterFiles, adapter_files
from ..files.peft_config import CONFIG_FILE, AdapterFileError, parse_json
from ..lora.config import ConfigError
from .errors import RequestError

MAX_JSON_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_CHUNK = 1 << 24


@dataclass(frozen=True)
class AdapterSnapshot:
    """An adapter directory as it was read: its files parsed and checked, and its path
    relative to ``--adapter-dir`` (the only name of it a client ever sees)."""

    label: str
    files: AdapterFiles


class AdapterReader:
    """Reads adapter directories from inside ``root`` (the server's ``--adapter-dir``)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root).resolve(strict=True)
        self.max_bytes = max_bytes
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._root_fd)

    def read(self, lora_path: str) -> AdapterSnapshot:
        """The adapter at ``lora_path`` (relative to ``--adapter-dir``, or absolute inside
        it), read and parsed; a ``RequestError`` that names no server path otherwise."""
        relative = self._inside(lora_path, Path(lora_path))
        label = relative.as_posix() if relative.parts else "."
        directory = self._open_beneath(relative, lora_path, _DIRECTORY)
        try:
            config = self._file(directory, relative, CONFIG_FILE, label, MAX_JSON_BYTES)
            extra = self._file(directory, relative, LORALAB_FILE, label, MAX_JSON_BYTES, True)
            weights = self._file(directory, relative, WEIGHTS_FILE, label, self.max_bytes)
        finally:
            os.close(directory)
        return AdapterSnapshot(label, _parse(label, config, extra, weights))

    # -- where a path leads -----------------------------------------------------------------

    def _inside(self, lora_path: str, path: Path) -> Path:
        """``path`` resolved (every ``..`` and symlink that exists followed), relative to
        the root; refused if it leads outside."""
        candidate = path if path.is_absolute() else self.root / path
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a loop, a NUL byte …
            raise RequestError(
                f"lora_path {lora_path!r} cannot be resolved: {_reason(error)}",
                param="lora_path",
            ) from None
        if not real.is_relative_to(self.root):
            raise RequestError(
                f"lora_path {lora_path!r} resolves outside --adapter-dir; refused",
                status=403,
                param="lora_path",
            )
        return real.relative_to(self.root)

    def _open_beneath(self, relative: Path, shown: str, flags: int) -> int:
        """A descriptor of root/relative, opened one component at a time from the root's
        descriptor without following any symlink."""
        fd = os.dup(self._root_fd)
        parts = relative.parts
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                try:
                    opened = os.open(part, flags if last else _DIRECTORY, dir_fd=fd)
                except NotADirectoryError:  # O_DIRECTORY met a symlink first, or a file
                    if _is_link(part, fd):
                        raise OSError(errno.ELOOP, "a symlink") from None
                    raise
                os.close(fd)
                fd = opened
            if not parts and flags != _DIRECTORY:
                raise IsADirectoryError(errno.EISDIR, "is --adapter-dir itself")
        except OSError as error:
            os.close(fd)
            raise _refusal(shown, error) from None
        return fd

    # -- reading one file -------------------------------------------------------------------

    def _file(
        self,
        directory: int,
        relative: Path,
        name: str,
        label: str,
        limit: int,
        optional: bool = False,
    ) -> bytes | None:
        shown = f"{label}/{name}"
        try:
            fd = os.open(name, _FILE, dir_fd=directory)
        except FileNotFoundError:
            if optional:
                return None
            hint = " (only safetensors are read)" if name == WEIGHTS_FILE else ""
            raise RequestError(f"{label} has no {name}{hint}", param="lora_path") from None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise _refusal(shown, error) from None
            # a symlink: followed only to a real path inside the root, then opened from it
            inside = self._inside(shown, self.root / relative / name)
            fd = self._open_beneath(inside, shown, _FILE)
        try:
            return _read_regular(fd, shown, limit)
        finally:
            os.close(fd)


def _read_regular(fd: int, shown: str, limit: int) -> bytes:
    """The whole of the regular file open at ``fd``, at most ``limit`` bytes."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise RequestError(f"{shown} is not a regular file; refused", status=403, param="lora_path")
    if info.st_size > limit:
        raise RequestError(
            f"{shown} is {info.st_size} bytes; the server reads adapter files of at most "
            f"{limit} bytes",
            param="lora_path",
        )
    chunks, size = [], 0
    while size <= info.st_size:  # one read past the end sees that nothing more came
        chunk = os.read(fd, min(_READ_CHUNK, info.st_size - size + 1))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > info.st_size:
        raise RequestError(f"{shown} grew while it was read; retry", param="lora_path")
    return b"".join(chunks)


def _parse(label: str, config: bytes, extra: bytes | None, weights: bytes) -> AdapterFiles:
    """The adapter in three files' bytes, checked; everything a hostile file can make
    ``json``, ``re`` or ``safetensors`` raise is a 400 naming the file."""
    weights_name = f"{label}/{WEIGHTS_FILE}"
    try:
        peft_config = parse_json(config, f"{label}/{CONFIG_FILE}")
        settings = None if extra is None else parse_json(extra, f"{label}/{LORALAB_FILE}")
        try:
            tensors = tensors_from_bytes(weights)
        except (SafetensorError, ValueError, OverflowError) as error:
            raise AdapterFileError(f"{weights_name} is truncated or corrupted: {error}") from None
        return adapter_files(Path(label), peft_config, settings, tensors, weights_name)
    except (AdapterFileError, ConfigError) as error:
        raise RequestError(str(error), param="lora_path") from None
    except RecursionError:
        raise RequestError(f"{label}: a setting is nested too deeply", param="lora_path") from None


def _is_link(name: str, directory: int) -> bool:
    try:
        os.readlink(name, dir_fd=directory)
    except OSError:
        return False
    return True


def _refusal(shown: str, error: OSError) -> RequestError:
    """The client's error for a failed open, by cause; no server path in it."""
    if error.errno in (errno.ELOOP, errno.EXDEV):
        return RequestError(
            f"{shown} is (or passes through) a symlink that changed after it was checked; refused",
            status=403,
            param="lora_path",
        )
    if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return RequestError(
            f"lora_path {shown!r} is not an adapter directory inside --adapter-dir",
            status=404,
            param="lora_path",
        )
    if error.errno == errno.EACCES:
        return RequestError(f"{shown}: permission denied", status=403, param="lora_path")
    return RequestError(f"{shown} cannot be opened: {_reason(error)}", param="lora_path")


def _reason(error: BaseException) -> str:
    """An error's reason without the path it carries (``OSError`` puts it in ``str``)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).split(":")[0]
