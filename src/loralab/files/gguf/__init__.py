"""llama.cpp's GGUF: the names and layouts (``layout``), an adapter as a LoRA GGUF
(``adapter``), a merged model as one GGUF (``merged``), and Ollama's Modelfile.
"""
