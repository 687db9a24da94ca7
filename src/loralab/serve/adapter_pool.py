"""The adapters a server knows, the ones resident on the model, and which one goes next.

At most ``max_loras`` adapters are on the model at once. Adapters named at start-up are
pinned; one loaded at run time that no running request uses may be evicted, least
recently used first, and is put back on the model when a request asks for it. Each
adapter's files are read once, off the engine's thread (``read``), and kept in memory as
checked (at most ``max_cpu_loras`` of them): the engine's thread never opens a file, and
what it puts on the model after an eviction is what was checked, whatever became of the
directory since. Every change to the model runs on the engine's thread, between decoding
steps; the list of names may be read from any thread.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..files.adapter_dir import load_adapter_tensors, read_adapter
from ..files.hot_swap import hot_swap_files
from ..files.peft_config import AdapterFileError
from ..lora import patterns
from ..lora.adapters import delete_adapter
from ..lora.config import ConfigError
from ..lora.inits import get_init
from ..lora.inject import base_module_names
from ..lora.variants import variant_for
from .adapter_reader import AdapterReader, AdapterSnapshot
from .errors import RequestError

_NAME = re.compile(r"[\w.:@+/-]{1,200}")
# The time one adapter's regexes may take over the model's module names, all together;
# matching real patterns over a few hundred names takes a few milliseconds.
PATTERN_SECONDS = 0.5
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30


@dataclass
class Entry:
    name: str
    snapshot: AdapterSnapshot  # its files as read and checked, put on the model from here
    pinned: bool
    resident: bool = False
    users: int = 0  # running requests on it
    used: int = 0  # when it was last asked for (a counter)
    removed: bool = False  # unloaded while in use: deleted from the model when free


class AdapterPool:
    def __init__(
        self,
        model: nn.Module,
        base_name: str,
        max_loras: int,
        adapter_dir: Path | None,
        metrics,
        max_cpu_loras: int | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max(max_loras, 64)
        self.reader = AdapterReader(adapter_dir, max_adapter_bytes) if adapter_dir else None
        self.module_names = [n for n in base_module_names(model) if n]  # before any adapter
        self.metrics = metrics
        self.entries: dict[str, Entry] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()  # guards entries for readers on other threads

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    # -- reading (any thread) -------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self.entries.values() if not e.removed]

    def is_resident(self, name: str | None) -> bool:
        return name is None or (name in self.entries and self.entries[name].resident)

    def is_pinned(self, name: str | None) -> bool:
        """The base (``None``) and adapters named at start-up: never evicted, so rows on
        them never keep a slot from a waiting adapter."""
        return name is None or (name in self.entries and self.entries[name].pinned)

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
        try:  # the operator's own path, anywhere: read once, as it is
            files = read_adapter(path, safetensors_only=True)
        except AdapterFileError as error:
            raise RequestError(str(error)) from None
        label = Path(path).name  # responses show no server path
        self._register(Entry(name, AdapterSnapshot(label, files), pinned=True))

    # -- the network's requests: read on a worker thread, then the rest on the engine's ------

    def read(self, lora_path: str) -> AdapterSnapshot:
        """The adapter a client named, read once from inside ``--adapter-dir`` and checked
        (``AdapterReader``), its regexes timed over the model's module names; blocking, so
        it runs on a worker thread, never on the engine's or the event loop's."""
        if self.reader is None:
            raise RequestError(
                "loading adapters at run time is off: start the server with --adapter-dir DIR "
                "to allow adapters from inside DIR",
                status=403,
                param="lora_path",
            )
        snapshot = self.reader.read(lora_path)
        try:
            with patterns.matching_deadline(PATTERN_SECONDS):
                snapshot.files.config.match_patterns(self.module_names)
        except patterns.PatternError as error:
            raise RequestError(f"{snapshot.label}: {error}", param="lora_path") from None
        return snapshot

    def load(self, name: str, snapshot: AdapterSnapshot, inplace: bool) -> str:
        """Register ``name`` with the adapter ``read`` gave and put it on the model; a
        message for the client.

        Loading a name again from the same directory changes nothing. With ``inplace`` a
        loaded name takes the new weights (hot-swap) and running requests go on with them.
        """
        self._check_name(name)
        entry = self.entries.get(name)
        if entry is not None and not entry.removed:
            if not inplace:
                if entry.snapshot.label == snapshot.label:
                    return f"adapter {name!r} is already loaded from {snapshot.label}"
                raise RequestError(
                    f"adapter {name!r} is already loaded (from another directory); pass "
                    "load_inplace=true to replace its weights, or unload it first",
                    status=409,
                    param="lora_name",
                )
            return self._replace(entry, snapshot)
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
        if len(self.names()) >= self.max_cpu_loras:
            raise RequestError(
                f"no room: the server keeps at most --max-cpu-loras {self.max_cpu_loras} "
                "adapters; unload one first",
                status=409,
                param="lora_name",
            )
        entry = Entry(name, snapshot, pinned=False, used=next(self._clock))
        self._register(entry)  # checked on the model before anything is evicted for it
        self._fit(entry)
        return f"adapter {name!r} loaded from {snapshot.label}"

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
            self._put_on_model(entry)  # from memory, as it was checked when loaded
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
            self._put_on_model(entry)  # checks everything first: a bad file loads nothing
        except BaseException:
            with self._lock:
                del self.entries[entry.name]
            raise

    def _put_on_model(self, entry: Entry) -> None:
        files, source = entry.snapshot.files, entry.snapshot.label
        config = files.config
        variant = variant_for(config)
        product = variant.factors_class.is_product
        if not product or config.modules_to_save:
            what = (
                f"{variant.name}'s ΔW (not a product B·A)"
                if not product
                else "modules_to_save copies"
            )
            raise RequestError(
                f"{source}: adapters with {what} cannot run per row of a batch; "
                "merge it into a base and serve that instead",
                param="lora_path",
            )
        if config.target_parameters:
            raise RequestError(
                f"{source}: the adapter adapts stacked expert weights (target_parameters), "
                "which cannot run per row of a batch; merge it into a base and serve that",
                param="lora_path",
            )
        if get_init(config.init).rewrites_base:
            raise RequestError(
                f"{source}: init_lora_weights={config.init!r} rewrites the base weights, "
                "which every other row uses; save it converted to a plain LoRA (loralab's "
                "save_adapter does by default) and serve that",
                param="lora_path",
            )
        try:
            with patterns.matching_deadline(PATTERN_SECONDS):
                load_adapter_tensors(self.model, config, files.tensors, entry.name, source=source)
        except (AdapterFileError, ConfigError) as error:
            raise RequestError(str(error), param="lora_path") from None
        entry.resident = True
        self.metrics.adapter_loads.inc()
        self.metrics.adapters_resident.set(self.resident_count())

    def _replace(self, entry: Entry, snapshot: AdapterSnapshot) -> str:
        """New weights for a known name: swapped in place when the shapes allow; an
        adapter of other shapes replaces it only while no request runs on it."""
        old = entry.snapshot
        if entry.resident:
            try:
                with patterns.matching_deadline(PATTERN_SECONDS):
                    hot_swap_files(self.model, snapshot.files, entry.name, snapshot.label)
            except (AdapterFileError, ConfigError) as error:
                if entry.users:
                    raise RequestError(
                        f"{error} (and requests are running on it)", param="lora_path"
                    ) from None
                self._off_model(entry)
                entry.snapshot = snapshot
                try:
                    self._put_on_model(entry)
                except RequestError:
                    entry.snapshot = old  # the old weights come back: nothing is lost
                    self._put_on_model(entry)
                    raise
        else:  # put on the model once, so that a file for another base is refused now
            entry.snapshot = snapshot
            try:
                self._put_on_model(entry)
            except RequestError:
                entry.snapshot = old
                raise
            self._fit(entry)
        entry.snapshot = snapshot
        return f"adapter {entry.name!r} replaced in place from {snapshot.label}"

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
