"""Differentially private `tff.aggregators` factories, one module each."""
