"""Registration of Python PC classes as PETSc PC types through ctypes.

petsc4py (3.18 and newer) exposes no ``PCRegister``. This module calls the C
function from the loaded PETSc library with a C-callable create function.
That function looks up the create function registered for ``python`` in
PETSc's ``PCList``, calls it, and then calls ``PCPythonSetType(pc, path)``
so that the new PC is a Python PC with the chosen context class. After
registration ``-pc_type NAME`` behaves like
``-pc_type python -pc_python_type PATH``, and ``-ksp_view`` reports
``type: NAME``.
"""

import atexit
import ctypes
import logging

from petsc4py import PETSc

log = logging.getLogger("petsc_nnpc.pc.registry")

# PETSC_ERR_PLIB: the error code returned when the Python side fails.
_PETSC_ERR_PLIB = 77

_CREATE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)

# C callbacks must outlive every PC made from them, so they stay here.
_callbacks = {}
_library = None


def _petsc_library():
    """Return a ctypes handle that resolves the symbols of the loaded libpetsc.

    ``dlsym`` on the petsc4py extension module also searches the libraries it
    depends on, which include the very libpetsc that petsc4py uses.
    """
    global _library
    if _library is None:
        library = ctypes.CDLL(PETSc.__file__)
        library.PCRegister.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        library.PCRegister.restype = ctypes.c_int
        library.PCPythonSetType.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        library.PCPythonSetType.restype = ctypes.c_int
        library.PetscFunctionListFind_Private.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        library.PetscFunctionListFind_Private.restype = ctypes.c_int
        library.PCSetType.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        library.PCSetType.restype = ctypes.c_int
        _library = library
    return _library


def _python_create_function(library):
    """Return the create function that PETSc's ``PCList`` holds for ``python``."""
    # Creating a PC runs PCInitializePackage, which fills PCList.
    PETSc.PC().create(comm=PETSc.COMM_SELF).destroy()
    pc_list = ctypes.c_void_p.in_dll(library, "PCList")
    function = ctypes.c_void_p()
    error = library.PetscFunctionListFind_Private(pc_list, b"python", ctypes.byref(function))
    if error or not function.value:
        raise RuntimeError(f"PC type 'python' not found in PCList (PETSc error code {error})")
    return _CREATE(function.value)


def register_pc_type(name, class_path):
    """Register ``name`` as a PETSc PC type made from the Python class ``class_path``.

    Parameters
    ----------
    name : str
        PC type name, used as ``-pc_type name``.
    class_path : str
        ``"module.Class"`` of the Python context, as for ``-pc_python_type``.

    Returns
    -------
    bool
        True on success. On failure a logged warning states that
        ``-pc_type python -pc_python_type class_path`` still works.
    """
    try:
        library = _petsc_library()
        python_create = _python_create_function(library)
        encoded_path = class_path.encode()

        def create(pc):
            try:
                error = python_create(pc)
                if error:
                    return error
                return library.PCPythonSetType(pc, encoded_path)
            except Exception:
                log.exception("creating PC type %s (%s) failed", name, class_path)
                return _PETSC_ERR_PLIB

        callback = _CREATE(create)
        error = library.PCRegister(name.encode(), ctypes.cast(callback, ctypes.c_void_p))
        if error:
            raise RuntimeError(f"PCRegister returned PETSc error code {error}")
    except (OSError, AttributeError, ValueError, RuntimeError) as error:
        log.warning(
            "could not register PC type %r (%s); use -pc_type python -pc_python_type %s instead",
            name, error, class_path,
        )
        return False
    _callbacks[name] = (callback, python_create, encoded_path)
    return True


def registered_pc_types():
    """Return the names registered by this module so far."""
    return sorted(_callbacks)


# Handles of live PCs whose Python context is one of this package's classes.
_live_python_pcs = set()


def track_python_pc(handle):
    """Remember a PC with a Python context, so that it is released before exit.

    petsc4py 3.18 destroys objects still alive at exit inside
    ``PetscFinalize`` (its garbage cleanup), after the interpreter has shut
    down. Destroying a Python PC there calls into Python and crashes with a
    segmentation fault (seen with petsc4py 3.18.5 whenever the context class
    comes from an imported module). The exit handler below switches every
    tracked PC to ``PCNONE`` while Python still runs, which drops the context.
    """
    _live_python_pcs.add(handle)


def untrack_python_pc(handle):
    """Forget a PC whose Python context has been destroyed."""
    _live_python_pcs.discard(handle)


def _release_python_pcs():
    if not _live_python_pcs:
        return
    library = _petsc_library()
    for handle in list(_live_python_pcs):
        library.PCSetType(ctypes.c_void_p(handle), b"none")
    _live_python_pcs.clear()


atexit.register(_release_python_pcs)
