"""Top-level typer app; each command lives in its own module."""

from __future__ import annotations

import typer

from musc_edge.cli import (
    bench_bank_cmd,
    bench_cmd,
    bench_line_cmd,
    bench_msm_cmd,
    bench_serve_cmd,
    bench_sinks_cmd,
    calibrate_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    rescore_cmd,
    run_cmd,
    serve_cmd,
    view_cmd,
    weights_cmd,
)

# rich_markup_mode=None: usage errors print as click's one plain line, whatever the terminal
# width, instead of a panel wrapped at it (each sub-app sets the same)
app = typer.Typer(
    help="MuSc zero-shot anomaly detection for production lines.",
    rich_markup_mode=None,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("eval")(eval_cmd.evaluate)
app.add_typer(weights_cmd.app, name="weights")
app.command("calibrate")(calibrate_cmd.calibrate)
app.command("run")(run_cmd.run)
app.command("view")(view_cmd.view)
app.command("export")(export_cmd.export)
app.add_typer(export_cmd.engine_app, name="engine")
app.command("demo")(demo_cmd.demo)
app.command("rescore")(rescore_cmd.rescore)
app.command("serve")(serve_cmd.serve)
bench_cmd.app.command("msm")(bench_msm_cmd.bench_msm)
bench_cmd.app.command("line")(bench_line_cmd.bench_line)
bench_cmd.app.command("bank")(bench_bank_cmd.bench_bank)
bench_cmd.app.command("sinks")(bench_sinks_cmd.bench_sinks)
bench_cmd.app.command("serve")(bench_serve_cmd.bench_serve)
app.add_typer(bench_cmd.app, name="bench")
