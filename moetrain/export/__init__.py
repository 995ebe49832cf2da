"""Export a checkpoint as a Hugging Face model folder (``moetrain export --format hf``).

- :mod:`.hf`: the folder: config.json, generation_config.json, tokenizer files, sharded
  ``model-*.safetensors`` with ``model.safetensors.index.json``, written to a temp folder and renamed;
- :mod:`.mixtral`: when the model's math is Mixtral's, the mapping onto ``MixtralForCausalLM``, and the
  reasons it is not otherwise;
- ``modeling_moetrain.py``: the self-contained remote-code model for everything else (copied as is).

Nothing here imports ``transformers``: export writes the same files with or without it.
"""

from moetrain.export.hf import export_hf

__all__ = ["export_hf"]
