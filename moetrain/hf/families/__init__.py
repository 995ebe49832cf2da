"""One module per Hugging Face model family, each implementing :class:`~moetrain.hf.families.base.Family`."""
