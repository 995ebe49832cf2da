"""Export a checkpoint as a Hugging Face model folder (``moetrain export --format hf``).

- :mod:`.hf`: the folder: config.json, generation_config.json, tokenizer files, sharded
  ``model-*.safetensors`` with ``model.safetensors.index.json``, written to a temp folder and renamed;
- :mod:`.family`: a Hugging Face family's own class through its mapping (``moetrain/hf/families/``): an
  imported run's family (``--target auto``), or any family by name (``--target qwen3_moe`` ...);
- :mod:`.mixtral`: whether a model trained in moetrain is ``MixtralForCausalLM`` (``--target auto``), and
  the reasons it is not otherwise;
- ``modeling_moetrain.py``: the self-contained remote-code model for everything else (copied as is).

Nothing here imports ``transformers``: export writes the same files with or without it.
"""

from moetrain.export.hf import export_hf

__all__ = ["export_hf"]
