"""An Ollama ``Modelfile`` beside each exported GGUF file.

Ollama builds a model from a Modelfile: ``FROM`` the base GGUF (a path absolute or
relative to the Modelfile), ``ADAPTER`` a LoRA GGUF, ``TEMPLATE`` a Go text/template over
``.Messages`` and ``PARAMETER stop`` lines. Ollama's own conversion picks its template by
comparing the GGUF's Jinja chat template with its known ones; here the same families are
recognised by their special tokens and written in Ollama's own form (its ``chatml``,
``llama3-instruct`` and ``mistral-instruct`` templates and their stop lists), so that
``ollama create`` needs no guessing. A template default system prompt (SmolLM2's "You are
a helpful AI assistant named SmolLM…") becomes ``SYSTEM``, since Ollama's templates have
none of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFamily:
    name: str  # Ollama's name for the template
    marker: str  # a special token only this family's Jinja template writes
    template: str  # Ollama's Go template, as its template/<name>.gotmpl has it
    stops: tuple[str, ...]
    system: str | None  # a rendered system turn as a pattern, its text the one group


FAMILIES = (
    ChatFamily(
        "chatml",
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    ),
    ChatFamily(
        "llama3-instruct",
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
    ChatFamily(
        "mistral-instruct",
        "[INST]",
        '[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}'
        '\n\n{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n{{- else if eq .Role '
        '"assistant" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}',
        ("[INST]", "[/INST]", "</s>"),
        None,  # Mistral's templates write no default system prompt
    ),
)

MODELFILE_SUFFIX = ".Modelfile"


def modelfile_name(gguf_file: Path) -> str:
    """``e2e.gguf`` → ``e2e.Modelfile`` (one per exported file, so exports can share a
    folder)."""
    return gguf_file.with_suffix(MODELFILE_SUFFIX).name


def modelfile(base: Path, adapter: Path | None, chat_template: str | None) -> str:
    """The Modelfile's text: ``FROM base`` (a GGUF file, or a Transformers directory that
    Ollama converts), ``ADAPTER adapter``, and the chat template in Ollama's form. Paths
    beside the Modelfile are written relative (``./…``), so the folder can move."""
    family = _family(chat_template)
    written = adapter or base  # the file this Modelfile is for
    lines = [
        f"# Ollama Modelfile written by loralab: ollama create NAME -f {modelfile_name(written)}",
        f"FROM {_path(base, written)}",
    ]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    if family is None:
        lines.append(
            "# the chat template is none Ollama has built in: Ollama reads the GGUF's own"
            if chat_template
            else "# the base has no chat template: prompts go to the model as they are"
        )
        return "\n".join(lines) + "\n"
    lines.append(f'TEMPLATE """{family.template}"""')
    system = default_system(chat_template, family)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {stop}" for stop in family.stops]
    return "\n".join(lines) + "\n"


def default_system(chat_template: str, family: ChatFamily) -> str | None:
    """The system prompt the Jinja template writes when the conversation has none."""
    if family.system is None:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        rendered = environment.from_string(chat_template).render(
            messages=[{"role": "user", "content": "Hi."}],
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )
    except Exception:  # a template that needs more context than this: Ollama has no SYSTEM
        return None
    found = re.search(family.system, rendered, re.DOTALL)
    return found.group(1) if found and '"""' not in found.group(1) else None


def _family(chat_template: str | None) -> ChatFamily | None:
    if not chat_template:
        return None
    return next((f for f in FAMILIES if f.marker in chat_template), None)


def _path(target: Path, beside: Path) -> str:
    """``./name`` for a file in the Modelfile's folder, else the absolute path."""
    target = target.resolve() if target.exists() else target.absolute()
    folder = beside.absolute().parent
    return f"./{target.name}" if target.parent == folder else str(target)
