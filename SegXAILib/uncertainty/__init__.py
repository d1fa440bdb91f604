"""Uncertainty from several predictions (MC dropout, TTA, ensembles) and from MHEX+ heads."""
