"""The preflight: a short run that proves a host (or a pod) fit for a config before training.

  python -m mwmae.preflight --config CFG [--workdir DIR] [--out FILE] [--config.x=y ...]

Five checks, each a line with its figure and a verdict (ok / warn / fail), and one JSON report
with the keys ``devices``, ``attention``, ``step``, ``input``, ``storage`` and ``verdict``:

* ``devices`` (:mod:`.hardware`): platform, kind, count, hosts, slices, memory, the config's mesh;
  that every host sees the same topology.
* ``attention`` (:mod:`.attention`): each implementation that runs here against the float32
  reference on the config's layer shapes (numerics), then its speed, and the choice this implies;
  the trainer's ``attention_impl="auto"`` takes these choices (:mod:`mwmae.train.attention_plan`).
* ``step`` (:mod:`.step`): compile time, step time, examples/s, MFU and compiled memory against the
  device's, with the measured attention.
* ``input`` (:mod:`.pipeline`): the config's input pipeline on this host against what the step
  consumes.
* ``storage`` (:mod:`.storage`): the workdir's write and read throughput and a checkpoint of the
  real state, as a share of the run's wall time at the config's cadence.

Every process runs it (the step and the checkpoint are collective); process 0 prints and writes.
"""
