"""The ``archipelago`` command line (typer).

Sub-commands are mounted lazily so ``archipelago --help`` stays fast and a missing optional piece
never breaks the others:

* ``simulate`` -- score a fleet on a trace with the discrete-event simulator (decide layer).
* ``plan``     -- run the planner on fleet / model / SLO YAML (decide layer).
* ``crds``     -- write the CRDs generated from the pydantic models.
* ``run``      -- start the operator (kopf).
* ``emulate``  -- impersonate a vLLM / SGLang server for one pod.
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
    from archipelago.api.crdgen import write_crds

    for path in write_crds(out):
        typer.echo(f"wrote {path}")


def _mount() -> None:
    """Attach the sub-commands that live in their own modules."""
    try:
        from archipelago.cli_simulate import simulate_command

        app.command("simulate", help="Simulate a fleet on a trace and print TTFT/TPOT/SLO attainment.")(
            simulate_command
        )
    except ImportError:  # pragma: no cover - only while the module is absent
        pass
    try:
        from archipelago.cli_plan import plan_command

        app.command("plan", help="Plan islands (GPU type x TP x replicas) for models under SLOs.")(plan_command)
    except ImportError:  # pragma: no cover
        pass


_mount()


if __name__ == "__main__":  # pragma: no cover
    app()
