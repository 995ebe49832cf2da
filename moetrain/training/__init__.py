"""Training: the loop and everything it calls between optimizer steps.

:mod:`.trainer` (setup + loop), :mod:`.callbacks` (metrics, evaluation, checkpoints),
:mod:`.routing` (StableMoE's stage switch, the balanced Hash table), :mod:`.fluctuation` (the
routing-fluctuation probe), :mod:`.optim` (parameter groups, LR schedule), :mod:`.engine` (the
DeepSpeed engine), :mod:`.checkpoint` (save / verify / load).
"""
