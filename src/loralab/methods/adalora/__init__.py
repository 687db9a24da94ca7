"""AdaLoRA (Zhang et al., 2023): SVD-form factors whose ranks a budget schedule
prunes by importance; the method, its settings, layers, budget, files and report.
"""
