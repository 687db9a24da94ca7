"""A training run: its settings (``config``), the loop, the loss, checkpoints,
several processes (``distributed``), the run's log and folder, and the memory savers.
"""
