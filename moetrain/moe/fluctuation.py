"""Routing fluctuation maths (StableMoE paper section 4.4.4, Fig. 2 and 7): do tokens keep changing expert?

Shape suffixes: the legend in ``moetrain/moe/__init__.py``; here P probes, L MoE layers, T probe tokens.

With ``L_t = max{k : a_t^(k) != a_t^(final)}`` (0 for a token that never left its final expert), the
paper's last-fluctuation-step distribution is the fraction of tokens with ``L_t > f * train.steps`` for
f in 10/20/50/80 %. The paper reports 40.9 / 29.1 / 15.4 % for BASE at 20 / 50 / 80 %; StableMoE
cannot fluctuate after its switch. The probe that records the routings is a training callback
(:mod:`moetrain.training.fluctuation`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

THRESHOLDS = (0.1, 0.2, 0.5, 0.8)


def last_change_steps(steps: Sequence[int], ids_PT: np.ndarray) -> np.ndarray:
    """L_t: the last probe step at which token t's expert differs from its final one (0 if never)."""
    differs_PT = ids_PT != ids_PT[-1]
    steps_P = np.asarray(steps, dtype=np.int64)
    return np.where(differs_PT, steps_P[:, None], 0).max(axis=0)


def fluctuation_report(steps: Sequence[int], ids_PLT: np.ndarray, total_steps: int) -> dict:
    """The content of ``fluctuation.json`` for probes ``ids_PLT`` taken at ``steps``."""
    layers = []
    for i in range(ids_PLT.shape[1]):
        ids_PT = ids_PLT[:, i]
        last_T = last_change_steps(steps, ids_PT)
        layers.append(
            {
                "layer": i,
                "last_change_after": {f"{f:g}": float((last_T > f * total_steps).mean()) for f in THRESHOLDS},
                "changed_since_previous": [float(x) for x in (ids_PT[1:] != ids_PT[:-1]).mean(axis=1)],
            }
        )
    return {
        "definition": "last_change_after[f] = fraction of probe tokens whose last expert change "
        "(L_t = max{k: a_t^(k) != a_t^(final)}) happened after f * total_steps",
        "total_steps": total_steps,
        "probe_steps": list(steps),
        "tokens": int(ids_PLT.shape[2]),
        "layers": layers,
    }
