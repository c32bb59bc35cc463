"""Generate a tiny training set on every rank, killed once mid-shard and resumed.

Usage: dataset_generate.py FOLDER. Rank 0 prints ``computed A B``: the
samples computed before the kill and by the resumed run.
"""

import sys

from petsc_nnpc.utils import init_petsc

PETSc = init_petsc([])

from petsc_nnpc.dataset import GenerationConfig, generate_dataset  # noqa: E402
from petsc_nnpc.layout import NaturalLayout  # noqa: E402
from petsc_nnpc.operator import GaussNewtonOperator, da_config_for_preset  # noqa: E402
from shallow_water.config import get_config  # noqa: E402
from shallow_water.model import ShallowWaterModel  # noqa: E402


class Killed(Exception):
    pass


def main(folder):
    model = ShallowWaterModel(get_config("tiny"))
    operator = GaussNewtonOperator.from_config(model, da_config_for_preset("tiny"))
    layout = NaturalLayout(model.comm, model.natural_indices(), model.n)
    x0 = layout.gather(model.advance(model.create_state(), 30))
    config = GenerationConfig(preset="tiny", states=10, k=6, shard_size=4, lead_min=2,
                              lead_max=6, seed=3)
    before = []

    def kill_at_six(i):
        before.append(i)
        if i == 6:
            raise Killed(i)

    try:
        generate_dataset(model, operator, config, folder, x0, on_sample=kill_at_six, progress=False)
    except Killed:
        pass
    after = generate_dataset(model, operator, config, folder, x0, progress=False)
    if model.comm.getRank() == 0:
        print(f"computed {len(before)} {after}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
