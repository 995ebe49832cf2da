"""Starting moetrain jobs: torchrun, the deepspeed launcher and SLURM batch jobs from one YAML config.

``moetrain launch CONFIG [overrides] --launcher torchrun|deepspeed|slurm`` checks the job before
anything starts (:mod:`.preflight`), builds a :class:`~moetrain.launch.plan.LaunchPlan` (the command
to run and the files to write first) and runs it, or prints it with ``--dry-run``. See
docs/launching.md. This package only starts processes; training itself is ``moetrain train``.
"""
