import os
import sys

# kernels read TRITON_INTERPRET when they are decorated: set it before anything imports them
if not os.environ.get("ROASTFX_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
