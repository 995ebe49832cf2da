"""The MoE layer and its parts: routers, dispatchers, grouped experts, aux losses and metrics.

Model-side code only: nothing here imports parallelism or training (``tests/test_layering.py``).

Shape suffixes -- the one legend for moetrain's model code, kernels, tests and benchmarks (a file
names only the letters it adds)::

    B batch            S sequence          T tokens (B*S; on this rank under data parallelism)
    D model dim        F expert hidden     V vocabulary
    E experts (global) L local experts (E / expert_parallel_size)       K top-k
    N rows of the permuted buffer (T*K on one process; flat (token, slot) index n = t*K + k)
"""
