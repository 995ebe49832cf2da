"""Per-rank memory of a training job, before it starts: ``moetrain plan`` and ``moetrain validate``.

- :mod:`.model_size`: exact parameter counts, from the real model built on the meta device;
- :mod:`.states`: parameters, gradients and optimizer state as DeepSpeed holds them, by ZeRO stage,
  expert-parallel size, precision and offload;
- :mod:`.activations`: what a micro-batch keeps for backward and backward's working set, by
  activation-checkpointing mode and routing imbalance;
- :mod:`.estimate`: one layout's terms and the step's peak; :mod:`.search`: the layouts that fit,
  best first; :mod:`.report`: the printed breakdown.

Model side only: nothing here imports parallelism, training or DeepSpeed (tests/test_layering.py).
The formula is documented in docs/parallelism.md ("Memory: moetrain plan") and measured against
training steps by ``bench/plan_memory.py``.
"""
