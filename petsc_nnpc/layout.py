"""Moves between distributed compact Vecs and the natural ordering.

Every model exposes ``natural_indices()``: for each locally owned entry of
its compact state Vec, the index of that entry in the natural ordering
(η, then u, then v, each row-major with y as the slow index). The natural
ordering is what files, the network and the tests use; it does not depend on
the number of ranks.
"""

import numpy as np


class NaturalLayout:
    """Gather and scatter between a compact Vec and natural-ordering arrays.

    Parameters
    ----------
    comm : PETSc.Comm
        Communicator of the Vecs.
    natural_indices : ndarray of int64, shape (local_size,)
        Natural index of each locally owned entry.
    n : int
        Global size.
    """

    def __init__(self, comm, natural_indices, n):
        self.comm = comm
        self.mpi = comm.tompi4py()
        self.natural_indices = np.ascontiguousarray(natural_indices, dtype=np.int64)
        self.n = int(n)
        self.local_size = self.natural_indices.size
        self.counts = self.mpi.allgather(self.local_size)
        total = sum(self.counts)
        if total != self.n:
            raise ValueError(f"natural indices cover {total} entries, expected n = {self.n}")
        # Rank 0 keeps all ranks' indices to place gathered values.
        self._all_indices = self.mpi.gather(self.natural_indices, root=0)
        if self.mpi.rank == 0:
            self._all_indices = np.concatenate(self._all_indices)

    def gather(self, local, root=0, to_all=False):
        """Return the natural-ordering array of a distributed field.

        ``local`` is a Vec or a local array of shape ``(local_size,)`` or
        ``(local_size, k)``. The result, of shape ``(n,)`` or ``(n, k)``, is
        returned on ``root`` (``None`` elsewhere), or on every rank when
        ``to_all`` is true.
        """
        array = _local_array(local)
        pieces = self.mpi.gather(array, root=root)
        result = None
        if self.mpi.rank == root:
            stacked = np.concatenate(pieces, axis=0)
            result = np.empty((self.n,) + stacked.shape[1:], dtype=stacked.dtype)
            result[self._all_indices] = stacked
        if to_all:
            result = self.mpi.bcast(result, root=root)
        return result

    def scatter(self, natural, root=0):
        """Return this rank's rows of a natural-ordering array held on ``root``.

        ``natural`` has shape ``(n,)`` or ``(n, k)`` on ``root`` and is ignored
        elsewhere. Each rank receives only its own rows.
        """
        if self.mpi.rank == root:
            natural = np.asarray(natural)
            if natural.shape[0] != self.n:
                raise ValueError(
                    f"natural-ordering array has {natural.shape[0]} rows, expected n = {self.n}"
                )
            chunks = []
            start = 0
            for count in self.counts:
                chunks.append(np.ascontiguousarray(natural[self._all_indices[start:start + count]]))
                start += count
        else:
            chunks = None
        return self.mpi.scatter(chunks, root=root)

    def scatter_to_vec(self, natural, vec, root=0):
        """Fill the compact Vec ``vec`` from a natural-ordering array on ``root``."""
        local = self.scatter(natural, root=root)
        vec.getArray()[:] = local
        return vec

    def from_replicated(self, natural):
        """Return this rank's rows of a natural-ordering array that every rank holds."""
        return np.ascontiguousarray(np.asarray(natural)[self.natural_indices])


def _local_array(local):
    if hasattr(local, "getArray"):
        return np.array(local.getArray(readonly=True), copy=True)
    return np.ascontiguousarray(local)
