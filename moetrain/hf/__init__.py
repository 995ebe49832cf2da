"""Hugging Face models in and out: each supported family's exact mapping to moetrain's model, and
``moetrain import`` and ``moetrain upcycle``.

- ``families/``: one module per family (the config fields it maps and how every tensor converts);
  ``families/base.py`` is the contract they share; :mod:`.convert` applies a family's rules;
- :mod:`.import_run`: ``moetrain import SRC RUN_DIR``, built from :mod:`.source` (the model folder, read
  without running anything in it), :mod:`.plan` (every tensor checked, then streamed into the step-0
  checkpoint), :mod:`.tokenizer` and :mod:`.run_files` (what an imported run keeps for export);
- :mod:`.upcycle`: ``moetrain upcycle SRC [SRC ...] RUN_DIR``, dense folders (the dense families
  ``families/llama.py``, ``qwen2.py``, ``qwen3.py``) as an MoE run directory; :mod:`.upcycle_weights`
  builds its step-0 checkpoint;
- export of the families' own classes: ``moetrain/export/family.py``.
"""
