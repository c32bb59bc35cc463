"""Spectral LMPs as PETSc PC types.

=============  ======================================  ==========================================
``-pc_type``   ``-pc_python_type``                     eigenpair source
=============  ======================================  ==========================================
``nnpc``       ``petsc_nnpc.pc.nnpc.NNPC``             trained network at the linearization state
``lmpexact``   ``petsc_nnpc.pc.exact.LMPExact``        leading eigenpairs of the operator (oracle)
``lmpnystrom`` ``petsc_nnpc.pc.nystrom.LMPNystrom``    randomized Nyström approximation
``lmpritz``    ``petsc_nnpc.pc.ritz.LMPRitz``          Ritz pairs of the previous CG solve
``lmpfile``    ``petsc_nnpc.pc.static.LMPFile``        eigenpairs read from a file, fixed over states
=============  ======================================  ==========================================

``import petsc_nnpc`` calls :func:`register_all`, so the names in the first
column work as ``-pc_type``; the class paths always work with
``-pc_type python``.
"""

from petsc_nnpc.pc.registry import register_pc_type, registered_pc_types

PC_TYPES = {
    "nnpc": "petsc_nnpc.pc.nnpc.NNPC",
    "lmpexact": "petsc_nnpc.pc.exact.LMPExact",
    "lmpnystrom": "petsc_nnpc.pc.nystrom.LMPNystrom",
    "lmpritz": "petsc_nnpc.pc.ritz.LMPRitz",
    "lmpfile": "petsc_nnpc.pc.static.LMPFile",
}


def register_all():
    """Register every PC type of :data:`PC_TYPES` with PETSc; return the names that worked."""
    return [name for name, path in PC_TYPES.items() if register_pc_type(name, path)]


__all__ = ["PC_TYPES", "register_all", "register_pc_type", "registered_pc_types"]
