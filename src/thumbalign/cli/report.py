"""`thumbalign report`: one self-contained HTML page for a run folder."""

from __future__ import annotations


def add_parser(commands) -> None:
    rep = commands.add_parser("report", help="write report.html for a run folder",
                              description="Write one self-contained HTML page for a run: training curves, UDM "
                                          "weights, held-out tables and sampled answers.")
    rep.add_argument("run_dir", help="a thumbalign train --output-dir")
    rep.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    rep.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..analysis.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0
