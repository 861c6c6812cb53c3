"""Hyperparameter sweeps on Ray Tune: the search space, the run, the report."""
