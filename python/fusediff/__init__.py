"""fusediff: diffusion models, schedulers and pipelines whose hot paths run fused kernels.

``fusediff.kernels`` holds the ops (each with a plain-PyTorch ``*_ref``); the compiled
extension ``fusediff._C`` holds the C++/CUDA code and is loaded when a fused op first runs.
"""

__version__ = "0.1.0"

from . import kernels

__all__ = ["__version__", "kernels"]
