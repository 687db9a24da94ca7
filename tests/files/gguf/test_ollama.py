"""The Ollama Modelfile written beside each exported GGUF file."""

from __future__ import annotations

from pathlib import Path

from loralab.files.gguf.ollama import modelfile, modelfile_name

SMOLLM2 = (  # SmolLM2-Instruct's template: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
)


def test_an_adapter_modelfile_names_the_base_and_the_adapter_beside_it(tmp_path):
    base = tmp_path / "models" / "base.gguf"
    base.parent.mkdir()
    base.write_bytes(b"GGUF")
    text = modelfile(base, tmp_path / "out" / "e2e.gguf", SMOLLM2)
    lines = text.splitlines()
    assert lines[0].endswith("ollama create NAME -f e2e.Modelfile")
    assert lines[1] == f"FROM {base.resolve()}"  # not beside it: absolute
    assert lines[2] == "ADAPTER ./e2e.gguf"
    assert (
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""'
    ) in text
    assert (
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    )
    assert lines[-2:] == ["PARAMETER stop <|im_start|>", "PARAMETER stop <|im_end|>"]


def test_a_merged_modelfile_is_from_its_own_file(tmp_path):
    text = modelfile(tmp_path / "merged.gguf", None, LLAMA3)
    assert "FROM ./merged.gguf\n" in text and "ADAPTER" not in text
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert "SYSTEM" not in text  # this template writes no default system prompt
    assert "PARAMETER stop <|eot_id|>" in text
    assert modelfile_name(Path("a/merged.gguf")) == "merged.Modelfile"


def test_an_unknown_template_is_left_to_ollama(tmp_path):
    text = modelfile(tmp_path / "m.gguf", None, "{{ messages[0]['content'] }}")
    assert "TEMPLATE" not in text and "reads the GGUF's own" in text
    assert "prompts go to the model as they are" in modelfile(tmp_path / "m.gguf", None, None)
