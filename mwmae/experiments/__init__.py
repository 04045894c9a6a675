"""Experiments that reproduce the paper's claims at a size this project's machines run."""
