"""Training: the generic loop and what it calls between optimizer steps. It knows no router: what
routing needs between steps, the model declares (``moetrain/moe/hooks.py``).

- :mod:`.trainer`: setup and the loop; :mod:`.callbacks`: metrics, evaluation, checkpoints;
  :mod:`.moe_hooks`: the callback that runs the model's declared hooks;
- :mod:`.optim`: parameter groups (tagged groups a hook may freeze), LR schedule; :mod:`.engine`: the
  DeepSpeed engine;
- :mod:`.checkpoint` (the collective save, choose, load into the engine; the format itself is
  ``moetrain.checkpoint``), :mod:`.state_io` (model and Adam state by global name through DeepSpeed's
  optimizer, in any layout), :mod:`.resume_checks` (what may change on resume);
- :mod:`.nonfinite` (``train.nonfinite``), :mod:`.determinism` (``train.deterministic``),
  :mod:`.host_memory` (CPU allocator and kernel caches), :mod:`.run_dir` (writable run directory).
"""
