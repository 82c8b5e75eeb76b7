"""The ``archipelago`` command line (typer).

Sub-commands:

* ``simulate`` -- score a fleet on a trace with the discrete-event simulator (decide layer).
* ``plan``     -- run the planner on fleet / model / SLO YAML (decide layer).
* ``crds``     -- write the CRDs generated from the pydantic models.
* ``run``      -- start the operator (kopf).
* ``emulate``, ``emulate-fleet``, ``replay`` -- impersonate vLLM / SGLang servers and replay traces.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="archipelago",
    help="Heterogeneous GPU fleets for LLM inference: plan, simulate and operate.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("crds")
def crds_command(
    out: Path = typer.Option(Path("crds"), help="Directory to write one YAML file per CRD into."),
) -> None:
    """Write the CustomResourceDefinitions generated from the pydantic models."""
    from archipelago.api.crdgen import write

    for path in write(out):
        typer.echo(f"wrote {path}")


def _mount() -> None:
    """Attach the sub-commands that live in their own modules.

    Each module imports only what its command needs at module level (heavy imports such as
    torch, OR-Tools and kopf happen inside the commands), so mounting them is cheap.
    """
    from archipelago.cli_emulate import mount as mount_emulate
    from archipelago.cli_plan import plan_command
    from archipelago.cli_run import run_command
    from archipelago.cli_simulate import simulate_command

    app.command("simulate", help="Simulate a fleet on a trace and print TTFT/TPOT/SLO attainment.")(simulate_command)
    app.command("plan", help="Plan islands (GPU type x TP x replicas) for models under SLOs.")(plan_command)
    app.command("run", help="Run the operator (kopf): reconcile GPUPools, ServingSLOs and ModelDeployments.")(
        run_command
    )
    mount_emulate(app)


_mount()


if __name__ == "__main__":  # pragma: no cover
    app()
