"""Supervised training of the encoder: fine-tuning and probing with a classification head."""
