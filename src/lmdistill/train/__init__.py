"""The one training loop and what it needs: :mod:`~lmdistill.train.trainer` (Accelerate, exact resume, the NaN
guard), :mod:`~lmdistill.train.run` (a config -> a trainer), :mod:`~lmdistill.train.checkpoint` (atomic,
checksummed checkpoints), :mod:`~lmdistill.train.rundir` (output-directory lock and reuse rules),
:mod:`~lmdistill.train.guard` (divergence and collective timeouts), :mod:`~lmdistill.train.sources` and
:mod:`~lmdistill.train.mixture_source` (batch sources: packed blocks, domain mixtures),
:mod:`~lmdistill.train.optim` (the optimizer and schedules every loop shares). Methods plug in as objectives and
batch sources; they never fork the loop."""
