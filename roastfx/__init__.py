"""roastfx: ROAST model compression for PyTorch.

    import roastfx
    roastfx.compress(model, compression="100x")   # in place; one global memory
    roastfx.save(model, "model.safetensors")
    model = roastfx.load(build_model, "model.safetensors")
"""
from .checkpoint import load, read_plan, save
from .compress import apply_plan, compress, parse_compression
from .module import RoastState, roast_state
from .plan import Plan, Site
from .profiles import PROFILES, HardwareProfile, get_profile

__version__ = "0.1.0"

__all__ = [
    "compress", "apply_plan", "parse_compression", "save", "load", "read_plan",
    "Plan", "Site", "RoastState", "roast_state", "HardwareProfile", "PROFILES", "get_profile",
]
