"""Where a run made by ``moetrain import`` keeps the source's own files (read back by ``moetrain export``).

- ``RUN_DIR/hf/config.json`` (and ``generation_config.json``): the imported files as they were; export
  writes the family's class from them, so the fields moetrain does not own come back unchanged;
- ``RUN_DIR/hf/import.json``: where the weights came from (the folder, the class) and the source tensors
  moetrain's model leaves out (DeepSeek-V3's multi-token-prediction layers), which only the step-0
  checkpoint carries (``unmapped.safetensors``): export of a later checkpoint says the folder has none;
- ``RUN_DIR/tokenizer/``: the tokenizer files, which ``data.tokenizer`` names.
"""

from __future__ import annotations

from pathlib import Path

HF_DIR = "hf"
TOKENIZER_DIR = "tokenizer"
KEPT = ("config.json", "generation_config.json")
IMPORT_RECORD = "import.json"


def imported_config_path(run_dir: Path) -> Path:
    """``RUN_DIR/hf/config.json``: present exactly when the run was made by ``moetrain import``."""
    return run_dir / HF_DIR / "config.json"


def import_record_path(run_dir: Path) -> Path:
    return run_dir / HF_DIR / IMPORT_RECORD
