"""Online training on the tiny preset on every rank, killed after epoch 2 and resumed.

Usage: dataset_online.py OUT. Rank 0 prints ``epochs E chain I`` after the
resumed run: the epochs in metrics.csv and the chain position.
"""

import csv
import os
import sys

import torch

from petsc_nnpc.utils import init_petsc

PETSc = init_petsc([])

from petsc_nnpc.dataset import GenerationConfig, initial_state  # noqa: E402
from petsc_nnpc.train import TrainConfig, train_online  # noqa: E402


class Killed(Exception):
    pass


def main(out):
    torch.set_num_threads(1)
    comm = PETSc.COMM_WORLD
    generation = GenerationConfig(preset="tiny", k=8, shard_size=4, lead_min=2, lead_max=6, seed=5)
    config = TrainConfig(epochs=3, batch_size=2, seed=5)
    x0 = initial_state("tiny") if comm.getRank() == 0 else None

    def kill_after_two(epoch, row):
        if epoch == 2:
            raise Killed(epoch)

    def run(on_epoch_end=None):
        return train_online(out, "tiny", config, generation, x0, rank=16, states_per_epoch=3,
                            capacity=5, validation_states=2, comm=comm, progress=False,
                            on_epoch_end=on_epoch_end)

    # The callback runs on every rank, so all ranks stop after epoch 2 as
    # when mpiexec is killed.
    killed = 0
    try:
        run(kill_after_two)
    except Killed:
        killed = 1
    killed = comm.tompi4py().allreduce(killed)
    summary = run()
    if comm.getRank() == 0:
        with open(os.path.join(out, "metrics.csv")) as handle:
            rows = list(csv.DictReader(handle))
        print(f"killed {killed} epochs {len(rows)} best {summary['best_val_loss']:.6g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
