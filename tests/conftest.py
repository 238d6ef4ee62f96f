"""Test-session setup shared by every test module.

Numba's CUDA simulator: the CUDA kernels (kbitcli.kernels.cuda) are tested on machines
without a GPU by running them in Numba's simulator, which has to be switched on before
numba is first imported anywhere in the process, hence here, at the top of the root
conftest. Set KBIT_REAL_GPU=1 to test on a real GPU instead (scripts/gpu_check.sh).

Under the simulator numba.cuda.is_available() is True: code that picks a device by
itself must use kbitcli.kernels.default_device() (which ignores the simulator), or the
tests would crawl through the simulator.
"""
from __future__ import annotations

import os

if os.environ.get("KBIT_REAL_GPU", "") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
