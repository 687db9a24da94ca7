"""Files: PEFT's adapter config and directories, the paper's loralib checkpoints,
atomic writes and output paths, and llama.cpp's GGUF with Ollama's Modelfile.
"""
