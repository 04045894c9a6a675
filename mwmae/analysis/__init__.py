"""The paper's attention analysis of a trained model: where each head looks and how its
outputs relate (``python -m mwmae.analysis``).

* :mod:`~mwmae.analysis.capture`: the encoder (whole inputs) and decoder (pretraining forward)
  passes with the model's ``capture_attention`` option: per layer, attention probabilities
  (B, heads, N, N) and head outputs, from the XLA reference;
* :mod:`~mwmae.analysis.geometry`: the patch grid and its units (patches, ms, mel bins, Hz);
* :mod:`~mwmae.analysis.metrics`: mean attention distance, attention entropy, linear CKA;
* :mod:`~mwmae.analysis.analyse`: batches through the passes, reduced to the report;
* :mod:`~mwmae.analysis.inputs`, :mod:`~mwmae.analysis.weights`: clips from shards, weights
  from an artifact or a workdir;
* :mod:`~mwmae.analysis.figures`: the PNGs (matplotlib, the ``demo`` extra).
"""
