"""The MoE layer and its parts: routers, dispatchers, grouped experts, aux losses and metrics.

Legend used in every file here: T tokens, D model dim, F expert hidden dim, E experts (global),
L local experts, K top-k, N rows of the permuted buffer (T*K on one process).
"""
