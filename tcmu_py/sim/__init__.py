"""The simulated kernel: test and benchmark any handler without root or target_core_user."""

from tcmu_py.sim.harness import ScsiError, SimTarget
from tcmu_py.sim.kernel import SimKernel, SimResult

__all__ = ["ScsiError", "SimKernel", "SimResult", "SimTarget"]
