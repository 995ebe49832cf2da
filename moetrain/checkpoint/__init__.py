"""moetrain's checkpoint format, readable and writable without DeepSpeed.

Layout of ``<run_dir>/checkpoints/step_000100/`` (format 2)::

    shared.safetensors      every non-expert parameter (fp32), its Adam state, the buffers
    experts_00000.safetensors ...   one file per EP rank's experts, one slice per *global* expert id;
                            keys ``value|exp_avg|exp_avg_sq/<param>/<id>``
    rng/rank_00000.json ... each rank's RNG states
    state.json              step, tokens, layout, resolved config, data fingerprint, LR schedule and
                            optimizer-group hyperparameters, format version
    manifest.json           size and sha256 of every file above
    COMMITTED               written last

Nothing here is a pickle: tensors are safetensors, everything else JSON, so loading a checkpoint cannot
run code. Tensors are keyed by parameter name and global expert id, not by rank, so a checkpoint loads
at another world size, expert-parallel size or ZeRO stage.

- :mod:`~moetrain.checkpoint.folders`: where checkpoints live, which one verifies, committing a written
  folder atomically, pruning, setting a run's history aside;
- :mod:`~moetrain.checkpoint.tensors`: the safetensors files' keys, reading them (one process: the
  whole model with every expert; one rank: the experts it owns), writing them;
- :mod:`~moetrain.checkpoint.manifest`: sizes, sha256 sums and the commit marker;
- :mod:`~moetrain.checkpoint.rng`: RNG states as JSON.

The training side (``moetrain/training/checkpoint.py``) adds what needs DeepSpeed and the process
group: gathering partitioned optimizer state, the collective save, loading into the engine.
"""

from moetrain.checkpoint.folders import FORMAT, checkpoint_dir, read_state, step_folders
from moetrain.checkpoint.manifest import verify
from moetrain.checkpoint.tensors import consolidated_state_dict, read_buffers

__all__ = [
    "FORMAT",
    "checkpoint_dir",
    "consolidated_state_dict",
    "read_buffers",
    "read_state",
    "step_folders",
    "verify",
]
