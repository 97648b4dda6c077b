"""Figures (matplotlib, Agg): registration overview, training curves, summaries."""
