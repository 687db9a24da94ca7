"""The LoRA core: settings, the frozen base and the layers around it, the variants
(DoRA), choosing targets and injecting, merging, several adapters on one model and
mixing them per row. It imports nothing else of loralab.
"""
