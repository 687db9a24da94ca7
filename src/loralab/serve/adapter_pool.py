"""The adapters a server knows, the ones resident on the model, and which one goes next.

At most ``max_loras`` adapters are on the model at once. Adapters named at start-up are
pinned; one loaded at run time that no running request uses may be evicted, least
recently used first, and is read again from its directory when a request asks for it.
Every change to the model runs on the engine's thread, between decoding steps; the list
of names may be read from any thread.
"""

from __future__ import annotations

import itertools
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..adapters import delete_adapter, hot_swap_adapter
from ..io import LORALAB_FILE, WEIGHTS_FILE, load_adapter_tensors, read_adapter
from ..peft_config import CONFIG_FILE, AdapterFileError
from .errors import RequestError

_NAME = re.compile(r"[\w.:@+/-]{1,200}")


@dataclass
class Entry:
    name: str
    path: Path
    pinned: bool
    resident: bool = False
    users: int = 0  # running requests on it
    used: int = 0  # when it was last asked for (a counter)
    removed: bool = False  # unloaded while in use: deleted from the model when free


class AdapterPool:
    def __init__(
        self, model: nn.Module, base_name: str, max_loras: int, adapter_dir: Path | None, metrics
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.max_loras = max_loras
        self.adapter_dir = adapter_dir.resolve(strict=True) if adapter_dir else None
        self.metrics = metrics
        self.entries: dict[str, Entry] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()  # guards entries for readers on other threads

    # -- reading (any thread) -------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self.entries.values() if not e.removed]

    def is_resident(self, name: str | None) -> bool:
        return name is None or (name in self.entries and self.entries[name].resident)

    def has_room(self) -> bool:
        """Whether one more adapter can be made resident now (a free slot, or an idle one
        to evict)."""
        return self.resident_count() < self.max_loras or bool(self._idle())

    def resident_count(self) -> int:
        return sum(e.resident for e in self.entries.values())

    # -- start-up ----------------------------------------------------------------------------

    def add_pinned(self, name: str, path: Path) -> None:
        """Load an adapter named on the command line; it is never evicted."""
        self._check_name(name)
        if name in self.entries:
            raise RequestError(f"adapter name {name!r} is given twice")
        if sum(e.pinned for e in self.entries.values()) >= self.max_loras:
            raise RequestError(
                f"more adapters named at start-up than --max-loras {self.max_loras} allows"
            )
        self._register(Entry(name, Path(path), pinned=True))

    # -- the network's requests (engine thread) ----------------------------------------------

    def resolve(self, lora_path: str) -> Path:
        """The adapter directory a client named, only if it lies inside ``--adapter-dir``
        (after every ``..`` and symlink is resolved): the network never picks other files."""
        if self.adapter_dir is None:
            raise RequestError(
                "loading adapters at run time is off: start the server with --adapter-dir DIR "
                "to allow adapters from inside DIR",
                status=403,
                param="lora_path",
            )
        candidate = Path(lora_path)
        if not candidate.is_absolute():
            candidate = self.adapter_dir / candidate
        try:
            real = candidate.resolve()  # every symlink that exists is followed
        except (OSError, RuntimeError, ValueError) as error:  # a loop, a NUL byte …
            raise RequestError(
                f"lora_path {lora_path!r} cannot be resolved: {error}", param="lora_path"
            ) from None
        if not real.is_relative_to(self.adapter_dir):
            raise RequestError(
                f"lora_path {lora_path!r} resolves outside --adapter-dir; refused",
                status=403,
                param="lora_path",
            )
        if not real.is_dir():
            raise RequestError(
                f"lora_path {lora_path!r} is not a directory inside --adapter-dir",
                status=404,
                param="lora_path",
            )
        self._check_files(real)
        return real

    def _check_files(self, directory: Path) -> None:
        """The directory, and every file an adapter is read from, lie inside --adapter-dir
        once their symlinks are followed, and the files are regular files (a FIFO would
        block the engine); checked again at every read, since the disk may change."""
        if not directory.resolve().is_relative_to(self.adapter_dir):
            raise RequestError(
                f"{directory.name} now resolves outside --adapter-dir; refused",
                status=403,
                param="lora_path",
            )
        for name in (CONFIG_FILE, WEIGHTS_FILE, LORALAB_FILE):
            path = directory / name
            if name == LORALAB_FILE and not path.exists():
                continue
            try:
                real = path.resolve(strict=True)
                regular = stat.S_ISREG(real.stat().st_mode)
            except (OSError, RuntimeError):
                hint = " (only safetensors are read)" if name == WEIGHTS_FILE else ""
                raise RequestError(
                    f"{directory.name} has no {name}{hint}", param="lora_path"
                ) from None
            if not regular or not real.is_relative_to(self.adapter_dir):
                raise RequestError(
                    f"{directory.name}/{name} is not a regular file inside --adapter-dir; refused",
                    status=403,
                    param="lora_path",
                )

    def load(self, name: str, path: Path, inplace: bool) -> str:
        """Register ``name`` at ``path`` and read it onto the model; a message for the client.

        Loading a name again with the same directory changes nothing. With ``inplace`` a
        loaded name takes the new weights (hot-swap) and running requests go on with them.
        """
        self._check_name(name)
        entry = self.entries.get(name)
        if entry is not None and not entry.removed:
            if not inplace:
                if entry.path == path:
                    return f"adapter {name!r} is already loaded from {path.name}"
                raise RequestError(
                    f"adapter {name!r} is already loaded (from another directory); pass "
                    "load_inplace=true to replace its weights, or unload it first",
                    status=409,
                    param="lora_name",
                )
            return self._replace(entry, path)
        if entry is not None:  # unloaded but still running: finish with it first
            raise RequestError(
                f"adapter {name!r} is being unloaded; retry when its requests finish",
                status=409,
                param="lora_name",
            )
        pinned = sum(e.pinned for e in self.entries.values())
        if pinned >= self.max_loras:
            raise RequestError(
                f"no room: all --max-loras {self.max_loras} slots hold adapters pinned at start-up",
                param="lora_name",
            )
        entry = Entry(name, path, pinned=False, used=next(self._clock))
        self._register(entry)  # checked on the model before anything is evicted for it
        self._fit(entry)
        return f"adapter {name!r} loaded from {path.name}"

    def unload(self, name: str) -> str:
        entry = self.entries.get(name)
        if entry is None or entry.removed:
            raise RequestError(
                f"no adapter named {name!r} is loaded; loaded: {self.names() or 'none'}",
                status=404,
                param="lora_name",
            )
        with self._lock:
            entry.removed = True
        self._drop_if_free(entry)
        return f"adapter {name!r} unloaded"

    # -- requests running on adapters (engine thread) ------------------------------------------

    def acquire(self, name: str | None) -> bool:
        """Make ``name`` resident for one more running request; False if there is no room
        now (every slot is pinned or in use), so the request waits."""
        if name is None:
            return True
        entry = self.entries.get(name)
        if entry is None or entry.removed:
            raise RequestError(f"adapter {name!r} was unloaded", status=404, param="model")
        if not entry.resident:
            if self.resident_count() >= self.max_loras and not self._evict_one():
                return False
            try:
                self._read_onto_model(entry)
            except RequestError as error:  # its directory changed since it was loaded
                raise RequestError(error.message, status=500, param="model") from None
        entry.users += 1
        entry.used = next(self._clock)
        return True

    def release(self, name: str | None) -> None:
        if name is None:
            return
        self.entries[name].users -= 1  # an unloaded one goes at the next sweep()

    def has_garbage(self) -> bool:
        return any(e.removed and not e.users for e in self.entries.values())

    def sweep(self) -> None:
        """Take off the model the unloaded adapters that no request runs on any more."""
        for entry in list(self.entries.values()):
            self._drop_if_free(entry)

    # -- the model ------------------------------------------------------------------------

    def _fit(self, entry: Entry) -> None:
        """Back within --max-loras after ``entry`` was read on: the least recently used idle
        adapter goes, or, with every slot busy, ``entry`` waits off the model."""
        if self.resident_count() > self.max_loras and not self._evict_one(keep=entry):
            self._off_model(entry)

    def _register(self, entry: Entry) -> None:
        """Know ``entry`` and read it onto the model; on any error it is not known."""
        with self._lock:
            self.entries[entry.name] = entry
        try:
            self._read_onto_model(entry)  # checks everything first: a bad file loads nothing
        except BaseException:
            with self._lock:
                del self.entries[entry.name]
            raise

    def _read_onto_model(self, entry: Entry) -> None:
        if not entry.pinned:  # a path the network gave: checked again at every read
            self._check_files(entry.path)
        try:
            files = read_adapter(entry.path, safetensors_only=True)
            config = files.config
            if config.use_dora or config.modules_to_save:
                what = "DoRA magnitudes" if config.use_dora else "modules_to_save copies"
                raise RequestError(
                    f"{entry.path.name}: adapters with {what} cannot run per row of a batch; "
                    "merge it into a base and serve that instead",
                    param="lora_path",
                )
            load_adapter_tensors(
                self.model, config, files.tensors, entry.name, source=entry.path.name
            )
        except AdapterFileError as error:
            raise RequestError(str(error), param="lora_path") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise RequestError(
                f"{entry.path.name}: cannot be read: {error}", param="lora_path"
            ) from None
        entry.resident = True
        self.metrics.adapter_loads.inc()
        self.metrics.adapters_resident.set(self.resident_count())

    def _replace(self, entry: Entry, path: Path) -> str:
        """New weights for a known name: swapped in place when the shapes allow; an
        adapter of other shapes replaces it only while no request runs on it."""
        if entry.resident:
            try:
                hot_swap_adapter(self.model, path, entry.name, safetensors_only=True)
            except AdapterFileError as error:
                if entry.users:
                    raise RequestError(
                        f"{error} (and requests are running on it)", param="lora_path"
                    ) from None
                old = entry.path
                self._off_model(entry)
                entry.path = path
                try:
                    self._read_onto_model(entry)
                except RequestError:
                    entry.path = old  # the old weights come back: nothing is lost
                    self._read_onto_model(entry)
                    raise
        else:  # read onto the model once, so that a file for another base is refused now
            old = entry.path
            entry.path = path
            try:
                self._read_onto_model(entry)
            except RequestError:
                entry.path = old
                raise
            self._fit(entry)
        entry.path = path
        return f"adapter {entry.name!r} replaced in place from {path.name}"

    def _off_model(self, entry: Entry) -> None:
        delete_adapter(self.model, entry.name)
        entry.resident = False
        self.metrics.adapters_resident.set(self.resident_count())

    def _drop_if_free(self, entry: Entry) -> None:
        if entry.removed and entry.users == 0:
            if entry.resident:
                self._off_model(entry)
            with self._lock:
                del self.entries[entry.name]

    def _idle(self, keep: Entry | None = None) -> list[Entry]:
        """The resident adapters that may be evicted: not pinned, no request on them."""
        return [
            e
            for e in self.entries.values()
            if e.resident and not e.pinned and not e.users and e is not keep
        ]

    def _evict_one(self, keep: Entry | None = None) -> bool:
        idle = self._idle(keep)
        if not idle:
            return False
        self._off_model(min(idle, key=lambda e: e.used))
        self.metrics.adapter_evictions.inc()
        return True

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(
                f"lora_name must be 1-200 letters, digits or ._:@+/- ; got {name!r}",
                param="lora_name",
            )
        if name == self.base_name:
            raise RequestError(f"lora_name {name!r} is the base model's name", param="lora_name")
