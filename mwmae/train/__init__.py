"""Pretraining: config schema, optimizer, train step and loop."""
