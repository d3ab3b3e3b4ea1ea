"""The loop study: per-loop diagnostics of a model and the sweep over loop counts.

  diagnostics.py  the per-loop measurements (step sizes, logit-lens readouts) and their plots
  sweep.py        runs the R = 1..4 variants with their controls and seeds, tables and plots
"""
