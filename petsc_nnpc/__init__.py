"""Learned state-dependent limited-memory preconditioners for PETSc.

Importing the package registers the PC types ``nnpc``, ``lmpexact``,
``lmpnystrom`` and ``lmpritz`` with PETSc, so that ``-pc_type nnpc`` works
next to ``-ksp_type cg``. The method is that of Trappler & Vidard,
"State-dependent preconditioning for the inner-loop in Variational Data
Assimilation using Machine Learning".
"""

__version__ = "0.1.0"


import importlib


def _register():
    from petsc_nnpc.utils import init_petsc

    init_petsc()
    try:
        pc = importlib.import_module("petsc_nnpc.pc")
    except ModuleNotFoundError as error:
        if error.name == "petsc_nnpc.pc":
            return
        raise
    pc.register_all()


_register()
