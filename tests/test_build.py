"""The installed package: fusediff, fusediff.kernels and the compiled fusediff._C import, and
the extension stands alone (no libtorch, no libcudart.so: DESIGN.md, decision 1)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusediff
import fusediff._C as C
import fusediff.kernels as K


def test_packages_import_and_map_to_their_sources():
    assert fusediff.kernels is K
    assert Path(K.__file__).parent.name == "kernels"
    assert C.NUM_COEFFS == K.scheduler_step_coeffs.NUM_COEFFS
    assert C.MAX_HISTORY == K.scheduler_step_coeffs.MAX_HISTORY
    assert isinstance(C.cuda_built(), bool)


def needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link -> .dynstr
    names = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_extension_links_neither_libtorch_nor_shared_cudart():
    needed = needed_libraries(C.__file__)
    assert any(n.startswith("libc.so") for n in needed), needed  # the parser found the entries
    bad = [n for n in needed if n.startswith(("libtorch", "libc10", "libcudart", "libcuda."))]
    assert not bad, f"{C.__file__} needs {bad}"


def test_extension_loads_without_torch():
    code = (
        "import importlib.machinery, importlib.util, sys\n"
        f"loader = importlib.machinery.ExtensionFileLoader('fusediff._C', {C.__file__!r})\n"
        "spec = importlib.util.spec_from_loader('fusediff._C', loader)\n"
        "mod = importlib.util.module_from_spec(spec); loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(mod.NUM_COEFFS, mod.cuda_built())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == str(K.scheduler_step_coeffs.NUM_COEFFS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_entry_point_without_a_gpu_raises_cleanly():
    x = torch.randn(8)
    args = (x.data_ptr(), x.data_ptr(), 0, [], x.data_ptr(), 0, 8, 0, [0.0] * C.NUM_COEFFS, 0, 0, 0)
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        C.scheduler_step_cuda(*args)
