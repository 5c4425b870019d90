"""`classp-fused tune` over a reduced grid: 4 of each method's 12 configurations.

The text stream's tuned comparison (docs/RESULTS.md, "Text stream") could not afford the full
grid on the shared CPU (about 25 s per configuration and seed at full size). Every
configuration kept here is one of ``classp_fused.cl.tune.GRIDS``' points (picked by index,
listed in RESULTS.md); the protocol is otherwise tune's own. Arguments are tune's:

    python docs/results_text_tune.py --benchmark synthetic-sentiment --seeds 1000, --out DIR
"""
from __future__ import annotations

import sys

from classp_fused import cli
from classp_fused.cl.tune import GRIDS, tune

#: Indices into each method's full grid (classp_fused/cl/tune.py).
KEPT = {
    "sgd": (4, 7, 9, 11),             # lr 0.03, 0.1, 0.2, 0.5
    "adagrad": (1, 2, 4, 7),          # lr 0.005, 0.01, 0.03, 0.1
    "classp": (0, 2, 4, 6),           # lr 0.03, 0.1 x threshold 0, 1e-4; power 1, scaling
    "ewc": (5, 6, 9, 10),             # lr 0.03, 0.1 x lam 10, 100
    "online-ewc": (5, 6, 9, 10),      # lr 0.03, 0.1 x lam 10, 100
    "mas": (5, 6, 9, 10),             # lr 0.03, 0.1 x lam 1, 10
    "classp+mas": (0, 1, 6, 7),       # lr 0.03, 0.1 x lam 0.1, 1; power 1, threshold 0
}
REDUCED = {method: [GRIDS[method][i] for i in kept] for method, kept in KEPT.items()}


def main(argv: list[str]) -> None:
    args = cli.parse_args(["tune", *argv])
    tuned = tune(cli.experiment_config(args), grids=REDUCED)
    for method in tuned["methods"]:
        print(f"{method:12} {tuned['hparams'].get(method, 'every configuration diverged')}")


if __name__ == "__main__":
    main(sys.argv[1:])
