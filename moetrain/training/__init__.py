"""Training: the loop and everything it calls between optimizer steps.

- :mod:`.trainer`: setup and the loop; :mod:`.callbacks`: metrics, evaluation, checkpoints;
- :mod:`.routing`: StableMoE's stage switch, the balanced Hash table; :mod:`.fluctuation`: the
  routing-fluctuation probe;
- :mod:`.optim`: parameter groups, LR schedule; :mod:`.engine`: the DeepSpeed engine;
- :mod:`.checkpoint` (save / choose / load, lifecycle), :mod:`.state_io` (model and Adam state by global
  name, in any layout), :mod:`.manifest` (sizes, sha256, commit marker), :mod:`.resume_checks` (what
  may change on resume);
- :mod:`.nonfinite` (``train.nonfinite``), :mod:`.determinism` (``train.deterministic``),
  :mod:`.run_dir` (writable run directory), :mod:`.faults` (failpoints for the reliability tests).
"""
