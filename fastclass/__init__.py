"""fastclass: a class list in, a clean versioned image dataset and a trained classifier out."""
import os

# fastclass spreads CPU work over processes, and its NumPy/SciPy arrays are tiny (8x8 to 32x32): OpenBLAS's
# own threads (one pool each in NumPy and SciPy) only busy-wait, costing ~0.2 s of CPU per command on two
# cores. Set before NumPy loads; a value in the environment wins. torch's kernels use MKL/OpenMP instead.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
