"""PETSc start-up, rank-aware logging and atomic file writes."""

import json
import logging
import os
import sys
import tempfile

LOGGER_NAME = "petsc_nnpc"


def petsc_options_from_argv(argv):
    """Return the PETSc options in ``argv``: ``-name [value]`` items.

    An item counts as a PETSc option when it starts with a single dash and a
    letter; the next item is its value unless it is itself such an option.
    Long options (``--preset``) and positional arguments are left out.
    """
    options = []
    index = 0
    while index < len(argv):
        item = argv[index]
        if _is_petsc_option(item):
            options.append(item)
            if index + 1 < len(argv) and not argv[index + 1].startswith("--") \
                    and not _is_petsc_option(argv[index + 1]):
                options.append(argv[index + 1])
                index += 1
        index += 1
    return options


def _is_petsc_option(item):
    return len(item) > 1 and item[0] == "-" and item[1].isalpha()


def init_petsc(petsc_args=None):
    """Initialize petsc4py once, with ``petsc_args`` as its options.

    Without ``petsc_args`` the PETSc options are taken from ``sys.argv``, so
    that ``-log_view`` and other start-up options work when
    ``import petsc_nnpc`` is the first import of PETSc. Calls after PETSc
    has been imported only return the module, because petsc4py reads its
    options once.
    """
    import petsc4py

    if "petsc4py.PETSc" not in sys.modules:
        if petsc_args is None:
            petsc_args = petsc_options_from_argv(sys.argv[1:])
        petsc4py.init([sys.argv[0] if sys.argv else "python", *petsc_args])
    from petsc4py import PETSc

    return PETSc


class _RankFilter(logging.Filter):
    def __init__(self, rank, all_ranks):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record):
        record.rank = self.rank
        return self.all_ranks or self.rank == 0


def comm_rank():
    """Return the rank in MPI_COMM_WORLD, or 0 when MPI is not initialized."""
    try:
        from mpi4py import MPI
    except ImportError:
        return 0
    return MPI.COMM_WORLD.Get_rank()


def setup_logging(verbose=False, all_ranks=None):
    """Configure the ``petsc_nnpc`` and ``shallow_water`` loggers.

    Only rank 0 logs unless ``all_ranks`` is true or the environment
    variable ``NNPC_LOG_ALL_RANKS=1`` is set.
    """
    if all_ranks is None:
        all_ranks = os.environ.get("NNPC_LOG_ALL_RANKS") == "1"
    rank = comm_rank()
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if all_ranks:
        fmt = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    for name in (LOGGER_NAME, "shallow_water"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A reader never sees a partial file: after a kill either the old file or
    the complete new one is there.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        # mkstemp creates the file readable by its owner only; give it the
        # permissions of a file made by open(), as the figures beside it have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def cpu_model(default="unknown CPU"):
    """Return the CPU model name from ``/proc/cpuinfo``, or ``default`` where it is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def read_npz(path):
    """Return the arrays of the ``.npz`` archive ``path`` as a dict, without loading pickles.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable ``.npz`` archive (truncated, empty or
        another format), or if it contains object arrays, which would need
        pickle and could run code.
    """
    import zipfile

    import numpy as np

    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except ValueError as error:
        if "allow_pickle" in str(error) and zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} contains object arrays, which are not loaded because unpickling can run "
                "code: store numeric or string arrays instead"
            ) from None
        raise ValueError(
            f"{path} is not a readable .npz archive ({error}): it is truncated or in another "
            "format; write it again"
        ) from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable .npz archive ({error}): it is truncated or in another "
            "format; write it again"
        ) from None


def atomic_save_npz(path, **arrays):
    """Save numpy arrays to ``path`` (``.npz``) atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
