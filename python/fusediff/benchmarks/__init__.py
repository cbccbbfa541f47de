"""Benchmark code that ships in the wheel, so that ``fusediff bench ...`` runs from an installed package
and the repository's ``bench/`` scripts have one harness and one set of model configurations to import.

    harness.py        timing (do_bench, wall clock, CUDA-graph replay), measured ceilings, CSV rows
    models.py         model configurations the benchmarks share (SD 1.5 UNet and VAE, DDPM CIFAR-10)
                      and FLOP counting
    pipeline.py       ``fusediff bench pipeline``: rows, columns, arguments, CSV rows, report (no torch)
    pipeline_run.py   its measurements on a CUDA GPU, fusediff against HF diffusers

What is here is what an installed command or more than one script needs. The per-op benchmarks, the
training benchmark, the profiler and the plots are scripts in the repository's ``bench/`` (not shipped:
they run from a checkout on the GPU machine and write ``bench/results/``); ``bench/harness.py`` re-exports
the harness with that directory as the default output, and ``bench/bench_pipeline.py`` is
``fusediff bench pipeline`` writing there. Nothing here is imported by ``import fusediff``.
"""
