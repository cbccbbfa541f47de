"""Benchmarks that ship with the package, so that ``fusediff bench ...`` runs from an installed wheel.

    harness.py        timing (do_bench, wall clock, CUDA-graph replay), measured ceilings, CSV rows
    models.py         model configurations the benchmarks share (SD 1.5 UNet and VAE, DDPM CIFAR-10)
                      and FLOP counting
    pipeline.py       ``fusediff bench pipeline``: rows, columns, arguments, CSV rows, report (no torch)
    pipeline_run.py   its measurements on a CUDA GPU, fusediff against HF diffusers

The scripts in the repository's ``bench/`` directory import these (``bench/harness.py`` re-exports
the harness). Nothing here is imported by ``import fusediff``.
"""
