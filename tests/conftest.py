import os
import sys

import torch

# Triton kernels run under the interpreter on CPU; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread per process avoids OpenMP threads spinning against each other
# when several processes (torchrun tests) share the 2 cores; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
