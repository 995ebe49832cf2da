"""Hugging Face models in and out: each supported family's exact mapping to moetrain's model.

``families/`` holds one module per family (the config fields it maps and how every tensor converts);
``families/base.py`` is the contract they share. The import and export commands build on it.
"""
