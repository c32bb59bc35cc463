"""The stages of the main job (see :mod:`petsc_nnpc.experiment`).

Every stage is collective over ``PETSc.COMM_WORLD``; rank 0 writes the
files and trains the network, the others take part in the model runs.
"""

import json
import logging
import os

import numpy as np

from petsc_nnpc.utils import atomic_save_npz, atomic_write_json, init_petsc

PETSc = init_petsc()

logger = logging.getLogger("petsc_nnpc.experiment")

OTHER_FORM = {"paper": "bhalf", "bhalf": "paper"}


def _collective(mpi, function):
    """Run ``function`` on rank 0 and raise its error on every rank."""
    error = None
    result = None
    if mpi.rank == 0:
        try:
            result = function()
        except Exception as caught:  # re-raised on every rank below
            error = caught
    error = mpi.bcast(error, root=0)
    if error is not None:
        raise error
    return mpi.bcast(result, root=0)


def leading_eigenpairs(mat, rank, tol=1e-8, seed=0):
    """Return ``(U_local, lam, lam_next, products)``: the ``rank`` leading eigenpairs of ``mat``.

    Uses the ``lmpexact`` eigensolver (SLEPc when importable, else block
    Lanczos); ``products`` counts the operator products spent.
    """
    from petsc_nnpc.pc.exact import LMPExact

    context = LMPExact()
    context.set_parameters(rank=rank + 1, tol=tol, seed=seed)
    pc = PETSc.PC().create(comm=mat.getComm())
    pc.setType(PETSc.PC.Type.PYTHON)
    pc.setPythonContext(context)
    pc.setOperators(mat)
    try:
        context._options_read = True  # parameters were set above; ignore the database
        pc.setUp()
        U = np.ascontiguousarray(context.lmp.U[:, :rank])
        lam = np.array(context.lmp.lam[:rank])
        lam_next = float(context.lmp.lam[rank])
        return U, lam, lam_next, context.setup_products
    finally:
        pc.destroy()


class Study:
    """The data and stage functions of one experiment folder."""

    def __init__(self, config, out_dir, progress=True, ksp_prefix="inner_", models=None):
        from petsc_nnpc.fourdvar import create_preset_model
        from petsc_nnpc.layout import NaturalLayout

        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.ksp_prefix = ksp_prefix
        self.models = dict(models or {})
        self.model = create_preset_model(config.preset)
        self.mpi = self.model.comm.tompi4py()
        self.layout = NaturalLayout(self.model.comm, self.model.natural_indices(), self.model.n)
        if self.mpi.rank == 0:
            os.makedirs(out_dir, exist_ok=True)

    def path(self, *parts):
        """Return a path inside the output folder."""
        return os.path.join(self.out_dir, *parts)

    def training_path(self, form):
        """Return the training folder (checkpoints, metrics) of the network for ``form``."""
        return self.path(f"model-{form}")

    def model_path(self, form):
        """Return the checkpoint folder of the trained network for ``form``."""
        if form in self.models:
            return os.path.abspath(self.models[form])
        return os.path.join(self.training_path(form), "model")

    def static_path(self, form):
        """Return the eigenpair file of the state-independent LMP for ``form``."""
        return self.path(f"static-{form}.npz")

    # Stage 1: states.

    def prepare_states(self):
        """Write ``states.npz``: the spun-up base state and the background."""
        from shallow_water import spinup, state

        preset = self.config.preset
        try:
            base = state.load_spunup_state(preset)
            background = state.load_background_state(preset)
            logger.info("using the spun-up and background states shipped for %s", preset)
        except FileNotFoundError:
            spin_days, mean_days = spinup.spinup_days(preset)
            logger.info("no shipped states for %s: spinning up for %g days", preset, spin_days)
            base = spinup.spin_up(self.model, spin_days, progress=self.progress,
                                  checkpoint=self.path("spinup-checkpoint.npz"))
            background = spinup.time_mean(self.model, base, mean_days, progress=self.progress)
        if self.mpi.rank == 0:
            atomic_save_npz(self.path("states.npz"), base=base, background=background)
        self.mpi.Barrier()

    def states(self):
        """Return ``(base, background)`` as Vecs."""
        with np.load(self.path("states.npz")) as archive:
            base, background = archive["base"], archive["background"]
        return self.model.from_natural(base), self.model.from_natural(background)

    def da_config(self, form):
        """Return the observation and covariance set-up of the preset in ``form``."""
        from petsc_nnpc.operator import da_config_for_preset

        return da_config_for_preset(self.config.preset, form=form)

    def operator(self, form):
        """Return a new Gauss-Newton operator of the preset in ``form``."""
        from petsc_nnpc.operator import GaussNewtonOperator

        return GaussNewtonOperator.from_config(self.model, self.da_config(form))

    # Stages 2 and 3: training set and network.

    def generate(self, form):
        """Write the training set of ``form`` to ``data-<form>/``."""
        from petsc_nnpc.dataset import GenerationConfig, generate_dataset

        config = self.config
        generation = GenerationConfig(
            preset=config.preset, form=form, states=config.states, k=config.k,
            seed=config.seed, shard_size=config.shard_size, lead_min=config.lead_min,
            lead_max=config.lead_max, perturbation=config.perturbation,
        )
        with np.load(self.path("states.npz")) as archive:
            base = archive["base"]
        generate_dataset(
            self.model, self.operator(form), generation, self.path(f"data-{form}"),
            initial_state=base, extra={"da_config": self.da_config(form).to_dict()},
            progress=self.progress,
        )

    def train(self, form):
        """Train the network of ``form`` on rank 0; write ``model-<form>/``."""
        def fit():
            from petsc_nnpc.dataset import ShardDataset
            from petsc_nnpc.train import TrainConfig, Trainer, prepare_network_config

            config = self.config
            data = ShardDataset(self.path(f"data-{form}"), preset=config.preset, form=form)
            training = TrainConfig(
                epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                seed=config.seed, device=config.device,
                init_eigenpairs=self.static_path(form) if config.warm_start else None,
            )
            network = prepare_network_config(
                config.preset, tuple(self.model.grid_shape), config.train_rank, data, training,
            )
            trainer = Trainer(
                self.training_path(form), training, network,
                metadata={"preset": config.preset, "form": form, "data": self.path(f"data-{form}")},
                progress=self.progress,
            )
            summary = trainer.fit(data)
            logger.info("trained the %s network: %s", form, summary)

        _collective(self.mpi, fit)

    # Stage 4: the state-independent LMP.

    def static_eigenpairs(self, form):
        """Write the exact leading eigenpairs at the background state to ``static-<form>.npz``."""
        from petsc_nnpc.pc.static import save_eigenpairs

        _, background = self.states()
        operator = self.operator(form)
        operator.linearize(background)
        mat = operator.create_mat()
        rank = max(max(self.config.ranks), self.config.train_rank if self.config.warm_start else 0)
        U, lam, lam_next, products = leading_eigenpairs(mat, rank, seed=self.config.seed)
        U_natural = self.layout.gather(U)
        if self.mpi.rank == 0:
            save_eigenpairs(self.static_path(form), U_natural, lam, lam_next,
                            form=form, state="background", products=products)
        logger.info("static LMP (%s): %d eigenpairs at the background, λ = %.4g … %.4g, "
                    "%d products", form, rank, lam[0], lam[-1], products)
        mat.destroy()
        self.mpi.Barrier()

    # Stage 5: the cycled twin experiment with every preconditioner.

    def compared_forms(self):
        """Return the forms solved in ``evaluate``: the configured ones plus the reference."""
        forms = list(self.config.forms)
        for form in list(forms):
            if OTHER_FORM[form] not in forms:
                forms.append(OTHER_FORM[form])
        return forms

    def specs(self, form):
        """Return ``[(label, options)]`` of the preconditioners compared in ``form``."""
        from petsc_nnpc.experiment import preconditioner_specs

        if form not in self.config.forms:
            return [("none", {"pc_type": "none"})]
        return preconditioner_specs(self.config, form, self.model_path(form), self.static_path(form))

    def twin_config(self):
        """Return the twin-experiment configuration of the study."""
        from petsc_nnpc.fourdvar import TwinConfig

        return TwinConfig(cycles=self.config.cycles, min_steps=1,
                          max_steps=self.config.twin_max_steps, seed=self.config.seed)

    def evaluate(self):
        """Run the twin experiment; solve each inner system with every preconditioner."""
        from petsc_nnpc.fourdvar import InnerSolver, TwinExperiment

        main = self.config.forms[0]
        base, background = self.states()
        twin = TwinExperiment(self.model, self.da_config(main), self.twin_config(), base,
                              background, out=self.path("twin"))
        records_path = self.path("evaluate-records.json")
        records = []
        if os.path.exists(records_path):
            with open(records_path, encoding="utf-8") as handle:
                records = json.load(handle)
        others = {form: self.operator(form) for form in self.compared_forms() if form != main}
        other_mats = {form: operator.create_mat() for form, operator in others.items()}
        solvers = {}

        def solve_all(cycle, outer, operator, mat, b):
            nonlocal records
            records = [r for r in records if (r["cycle"], r["outer"]) < (cycle, outer)]
            for form in self.compared_forms():
                if form == main:
                    system_mat, rhs = mat, b
                else:
                    other = others[form]
                    other.linearize(operator.state)
                    system_mat = other_mats[form]
                    rhs = _convert_rhs(operator, other, b)
                for index, (label, options) in enumerate(self.specs(form)):
                    if form == main and label == "none":
                        continue  # the twin experiment's own solve
                    key = (form, label)
                    if key not in solvers:
                        solvers[key] = InnerSolver(
                            system_mat, prefix=f"{self.ksp_prefix}{form}{index}_", options=options)
                    _, record = solvers[key].solve(rhs)
                    records.append(dict(record.to_dict(), preconditioner=label, form=form,
                                        cycle=cycle, outer=outer))
                    logger.info("cycle %d, %s, %s: %d iterations, %d products, %.2f s, %s",
                                cycle, form, label, record.iterations, record.products,
                                record.wall_time, record.converged_reason)
            if self.mpi.rank == 0:
                atomic_write_json(records_path, records)

        try:
            twin_records = twin.run(prefix=f"{self.ksp_prefix}{main}ref_",
                                    options={"pc_type": "none"}, on_system=solve_all,
                                    progress=self.progress)
        finally:
            for solver in solvers.values():
                solver.destroy()
        for record in twin_records:
            record.update(preconditioner="none", form=main)
        records = [r for r in records if r["cycle"] < self.config.cycles]
        ordered = sorted(twin_records + records, key=lambda r: (r["cycle"], r["outer"]))
        if self.mpi.rank == 0:
            atomic_write_json(self.path("results.json"), _json_ready(ordered))
        self.mpi.Barrier()

    # Stage 6: analysis of the first system.

    def first_system(self, form):
        """Return the twin experiment's first inner-loop system in ``form``."""
        from petsc_nnpc.fourdvar import first_twin_system

        base, background = self.states()
        return first_twin_system(self.model, self.da_config(form), self.twin_config(), base,
                                 background)

    def analyse(self):
        """Write ``analysis.json`` and ``eigenvectors.npz`` from the first system."""
        from petsc_nnpc.fourdvar import solve_inner_loop
        from petsc_nnpc.pc.static import save_eigenpairs

        config = self.config
        analysis = {"limit": {}, "learned_points": [], "spectrum": {}}
        top = max(max(config.limit_ranks), max(config.ranks))
        for form in self.compared_forms():
            system = self.first_system(form)
            U, lam, lam_next, products = leading_eigenpairs(system.mat, top, seed=config.seed)
            exact_path = self.path(f"exact-{form}.npz")
            U_natural = self.layout.gather(U)
            if self.mpi.rank == 0:
                save_eigenpairs(exact_path, U_natural, lam, lam_next, form=form)
            self.mpi.Barrier()
            none = solve_inner_loop(system, prefix=f"{self.ksp_prefix}an{form}none_",
                                    options={"pc_type": "none"})[1]
            curve = {"rank": [], "iterations": [], "none": none.iterations,
                     "mu": config.baseline_mu, "eigensolver_products": products}
            for r in config.limit_ranks:
                record = solve_inner_loop(
                    system, prefix=f"{self.ksp_prefix}an{form}{r}_",
                    options={"pc_type": "lmpfile", "pc_lmpfile_path": exact_path,
                             "pc_lmpfile_rank": r, "pc_lmpfile_mu": config.baseline_mu})[1]
                curve["rank"].append(r)
                curve["iterations"].append(record.iterations)
            analysis["limit"][form] = curve
            analysis["spectrum"][form] = [float(v) for v in lam]
            if form in config.forms:
                for r in config.ranks:
                    for mu in config.mus:
                        record = solve_inner_loop(
                            system, prefix=f"{self.ksp_prefix}an{form}nn{r}{mu}_",
                            options={"pc_type": "nnpc", "pc_nnpc_model": self.model_path(form),
                                     "pc_nnpc_rank": r, "pc_nnpc_mu": mu,
                                     "pc_nnpc_device": config.device})[1]
                        analysis["learned_points"].append({
                            "form": form, "rank": r, "mu": mu, "iterations": record.iterations})
            if form == config.forms[0]:
                analysis["predicted"] = self._predict(system, form)
        if self.mpi.rank == 0:
            atomic_write_json(self.path("analysis.json"), analysis)
        self.mpi.Barrier()

    def _predict(self, system, form):
        """Return the network's eigenvalues at the system's state; save its vectors."""
        def predict():
            from petsc_nnpc.network import load_checkpoint

            predictor = load_checkpoint(self.model_path(form), device=self.config.device)
            return predictor.predict(x_natural)

        x_natural = self.layout.gather(system.state)
        U, lam = _collective(self.mpi, predict)
        if self.mpi.rank == 0:
            atomic_save_npz(self.path("eigenvectors.npz"), U=U, lam=lam)
        return [float(v) for v in lam]

    # Stage 7: report.

    def report(self, stage_seconds, machine):
        """Write ``report.md`` and the figures from the results and the analysis."""
        from petsc_nnpc.report import write_report

        if self.mpi.rank != 0:
            return
        with open(self.path("results.json"), encoding="utf-8") as handle:
            records = json.load(handle)
        with open(self.path("analysis.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
        main = self.config.forms[0]
        analysis = {"limit": saved["limit"], "learned_points": saved["learned_points"]}
        if "predicted" in saved:
            analysis["spectrum"] = {"exact": saved["spectrum"][main], "predicted": saved["predicted"]}
        vectors_path = self.path("eigenvectors.npz")
        if os.path.exists(vectors_path):
            with np.load(vectors_path) as archive:
                U = archive["U"]
            r = U.shape[1]
            indices = sorted({0, 1, min(3, r - 1), r // 2, r - 1})
            analysis["eigenvectors"] = {"U": U, "indices": indices}
        metadata = {
            "preset": self.config.preset,
            "grid_shape": tuple(self.model.grid_shape),
            "n": self.model.n,
            "forms": ", ".join(
                f"{form} ({'every preconditioner' if form in self.config.forms else 'none only, as a reference'})"
                for form in self.compared_forms()),
            "cycles": self.config.cycles,
            "training states": self.config.states,
            "network rank": self.config.train_rank,
            "machine": machine,
            "stage seconds": ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()),
        }
        write_report(self.out_dir, records, metadata, analysis)


def _convert_rhs(source, target, b):
    """Return ``b`` of ``source``'s form as the right-hand side of ``target``'s form.

    The ``paper`` form solves ``A δx = b``; the ``bhalf`` form solves
    ``(I + B^{1/2} Gᵀ R⁻¹ G B^{1/2}) v = B^{1/2} b``.
    """
    out = b.duplicate()
    value = b.getArray(readonly=True)
    if source.form == target.form:
        out.getArray()[:] = value
    elif source.form == "paper":
        out.getArray()[:] = target.background_error.apply_sqrt(value)
    else:
        # b = B^{1/2} b_paper, so b_paper = B^{-1/2} b = B^{-1} (B^{1/2} b).
        half = source.background_error.apply_sqrt(value)
        out.getArray()[:] = source.background_error.apply_inverse(half)
    return out


def _json_ready(records):
    """Return records with numpy scalars turned into Python numbers."""
    return json.loads(json.dumps(records, default=lambda value: value.item()))
