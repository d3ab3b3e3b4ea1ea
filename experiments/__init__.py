"""Entry points: python -m experiments.NAME."""
