#!/usr/bin/env bash
# Set up the environment of petsc_nnpc in .venv/ at the repository root.
#
# Installs what is missing and skips what is already there:
#   * PETSc + petsc4py and MPI + mpi4py: Debian's packages (PETSc 3.18) when
#     apt-get is available and we are root; otherwise pip builds PETSc and
#     petsc4py from source (about 25 minutes on 2 cores; needs MPI compilers
#     and BLAS/LAPACK, see README.md).
#   * a virtual environment .venv/ with numpy, numba (the compiled model
#     kernels), torch (CPU), tqdm, matplotlib, safetensors and pytest;
#   * this package in editable mode.
# Usage: bash scripts/setup_env.sh   (safe to run again; it is quick then)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python_packages=("numpy<2" numba "torch==2.13.0" tqdm matplotlib safetensors pytest)

say() { printf '[setup] %s\n' "$*"; }

debian_path_available() {
    command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && [ -x /usr/bin/python3 ]
}

install_debian_packages() {
    local wanted=(python3-petsc4py python3-mpi4py python3-venv openmpi-bin)
    local missing=()
    for package in "${wanted[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "Debian packages already installed: ${wanted[*]}"
        return
    fi
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

debian_petsc4py_dir() {
    # Debian installs petsc4py under PETSC_DIR and finds it through PETSC_DIR
    # at import time; the venv gets a .pth file so that no variable is needed.
    local dir
    for dir in /usr/lib/petscdir/petsc3.*/x86_64-linux-gnu-real/lib/python3/dist-packages \
               /usr/lib/petscdir/petsc3.*/*-linux-gnu-real/lib/python3/dist-packages; do
        if [ -d "$dir/petsc4py" ]; then
            echo "$dir"
            return
        fi
    done
    return 1
}

make_venv() {
    local python=$1
    shift
    if [ -x "$venv/bin/python" ]; then
        say "virtual environment already exists: $venv"
    else
        say "creating virtual environment $venv"
        "$python" -m venv "$@" "$venv"
    fi
}

venv_has() {
    "$venv/bin/python" -c "import $1" >/dev/null 2>&1
}

install_python_packages() {
    if venv_has torch && venv_has numba && venv_has tqdm && venv_has matplotlib && venv_has safetensors \
            && venv_has pytest && "$venv/bin/python" -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) >= 2)'; then
        say "Python packages already installed"
    else
        say "installing Python packages: ${python_packages[*]}"
        "$venv/bin/python" -m pip install -q "${python_packages[@]}"
    fi
}

install_source_petsc() {
    # Without apt-get (or without root) PETSc is built by pip. MPI compilers
    # come from the mpich wheel unless MPICC is already set.
    if venv_has petsc4py && venv_has mpi4py; then
        say "petsc4py and mpi4py already installed"
        return
    fi
    say "building PETSc and petsc4py from source with pip (about 25 minutes on 2 cores)"
    "$venv/bin/python" -m pip install -q setuptools wheel cython "numpy<2"
    if [ -z "${MPICC:-}" ] && ! command -v mpicc >/dev/null 2>&1; then
        "$venv/bin/python" -m pip install -q mpich
        export PATH="$venv/bin:$PATH"
    fi
    "$venv/bin/python" -m pip install -q --no-build-isolation mpi4py
    "$venv/bin/python" -m pip install -q --no-build-isolation petsc petsc4py
}

if debian_path_available; then
    install_debian_packages
    make_venv /usr/bin/python3 --system-site-packages
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    petsc4py_dir=$(debian_petsc4py_dir) || {
        echo "[setup] error: python3-petsc4py is installed but its petsc4py folder was not found under /usr/lib/petscdir; reinstall it with 'apt-get install --reinstall python3-petsc4py-real'" >&2
        exit 1
    }
    echo "$petsc4py_dir" > "$site/petsc_debian.pth"
else
    say "apt-get not usable (not Debian, or not root): using the pip source build of PETSc"
    make_venv "$(command -v python3)"
    install_source_petsc
fi

install_python_packages

if "$venv/bin/python" -c 'import petsc_nnpc.cli; from shallow_water import ShallowWaterModel' >/dev/null 2>&1 \
        && [ -x "$venv/bin/nnpc" ]; then
    say "petsc_nnpc already installed in editable mode"
else
    say "installing petsc_nnpc in editable mode"
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root"
fi

"$venv/bin/python" - <<'PY'
import mpi4py
import numpy
import petsc4py
import torch

print(f"[setup] ready: petsc4py {petsc4py.__version__}, mpi4py {mpi4py.__version__}, "
      f"numpy {numpy.__version__}, torch {torch.__version__}")
PY
