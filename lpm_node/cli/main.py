"""The ``lpm-node`` command line: serve, console, process, measure, demo, audit, outbox, rerun, measuring, reindex,
model, doctor, phantom."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lpm_node import __version__
from lpm_node.core.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from ``--config`` with the command-line overrides applied."""
    node: dict[str, Any] = {}
    for key in ("host", "port", "ae_title", "data_dir", "database_url"):
        if getattr(args, key, None) is not None:
            node[key] = getattr(args, key)
    if getattr(args, "no_measure", False):
        node["measure"] = False
    if getattr(args, "role", None):
        node["role"] = args.role
    if getattr(args, "reuse_port", False):
        node["reuse_port"] = True
    if getattr(args, "allow_ae", None):
        node["allowed_ae_titles"] = list(args.allow_ae)
    overrides: dict[str, dict[str, Any]] = {"node": node}
    if getattr(args, "stable_seconds", None) is not None:
        overrides["series"] = {"stable_seconds": args.stable_seconds}
    if getattr(args, "destination", None):
        overrides["output"] = {"destinations": list(args.destination)}
    if getattr(args, "model", None) and getattr(args, "demo_model", False):
        raise ValueError("--model and --demo-model exclude each other")
    if getattr(args, "model", None):
        overrides["model"] = {"folder": str(args.model)}
    elif getattr(args, "demo_model", False):
        from lpm_node.demo.model import bundled_model_folder

        overrides["model"] = {"folder": str(bundled_model_folder())}
    if getattr(args, "device", None):
        overrides.setdefault("model", {})["device"] = args.device
    console = {key: getattr(args, f"console_{key}") for key in ("host", "port")
               if getattr(args, f"console_{key}", None) is not None}
    if console:
        overrides["console"] = console
    return load_settings(getattr(args, "config", None), overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from lpm_node.node.service import serve

    settings = _settings(args)
    if getattr(args, "console", False):
        from lpm_node.console.server import start_console_thread

        start_console_thread(settings)
    return serve(settings)


def _cmd_console(args: argparse.Namespace) -> int:
    from lpm_node.console.server import run_console

    return run_console(_settings(args))


def _cmd_audit(args: argparse.Namespace) -> int:
    from lpm_node.cli.audit import audit_command

    return audit_command(_settings(args), args)


def _cmd_measure(args: argparse.Namespace) -> int:
    from lpm_node.cli.measure import measure_command

    return measure_command(_settings(args), args)


def _cmd_process(args: argparse.Namespace) -> int:
    from lpm_node.cli.process import process_command

    return process_command(_settings(args), args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from lpm_node.demo.run import demo

    return demo(_settings(args), args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from lpm_node.cli.doctor import doctor

    return doctor(_settings(args), args)


def _cmd_model_verify(args: argparse.Namespace) -> int:
    from lpm_node.cli.model import verify_command

    return verify_command(args)


def _cmd_outbox(args: argparse.Namespace) -> int:
    from lpm_node.cli.outbox import outbox_command

    return outbox_command(_settings(args), args)


def _cmd_rerun(args: argparse.Namespace) -> int:
    from lpm_node.cli.recovery import rerun_command

    return rerun_command(_settings(args), args)


def _cmd_measuring(args: argparse.Namespace) -> int:
    from lpm_node.cli.recovery import measuring_command

    return measuring_command(_settings(args), args)


def _cmd_reindex(args: argparse.Namespace) -> int:
    from lpm_node.cli.recovery import reindex_command

    return reindex_command(_settings(args), args)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from lpm_node.cli.phantom import phantom_command

    return phantom_command(args)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="nnU-Net v2 model folder (default: [model] folder of --config; required)")
    p.add_argument("--demo-model", action="store_true",
                   help="use the bundled phantom-trained test model (tests and demos only, never for clinical use)")


def _console_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--console-host", help="the console's address (default 127.0.0.1; elsewhere a login is required)")
    p.add_argument("--console-port", type=int, help="the console's HTTP port (default 8480)")


def _node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (default: built-in defaults)")
    p.add_argument("--data-dir", help="folder for the spool, outbox and the default SQLite database")
    p.add_argument("--database-url", metavar="URL",
                   help="the audit database (default: SQLite in --data-dir; several machines: "
                        "postgresql+psycopg://USER@HOST/DB)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lpm-node``."""
    parser = argparse.ArgumentParser(
        prog="lpm-node",
        description="DICOM node measuring liver attenuation (DL-parenchymal) on unenhanced chest CT.",
    )
    parser.add_argument("--version", action="version", version=f"lpm-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = add("serve", _cmd_serve, "run the DICOM node (listener, rules, worker, sender)")
    _node_options(p)
    p.add_argument("--host", help="address to listen on")
    p.add_argument("--port", type=int, help="DICOM port")
    p.add_argument("--ae-title", help="the node's AE title")
    p.add_argument("--stable-seconds", type=float, help="seconds without a new instance before a series is complete")
    p.add_argument("--allow-ae", action="append", metavar="TITLE", help="accepted calling AE titles (repeatable)")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT", help="where results go (repeatable)")
    _model_options(p)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="inference device")
    p.add_argument("--no-measure", action="store_true", help="receive, decide and queue only; measure nothing")
    p.add_argument("--console", action="store_true", help="also serve the web console ([console] settings)")
    p.add_argument("--role", choices=["all", "receiver", "worker", "sender"],
                   help="the part of the node this process runs (default all; the others need --database-url "
                        "postgresql+psycopg://...)")
    p.add_argument("--reuse-port", action="store_true",
                   help="share the DICOM port with other receiver processes on this machine (SO_REUSEPORT)")
    _console_options(p)

    p = add("console", _cmd_console, "the administrators' web console: find series, their story, queues, health")
    _node_options(p)
    _console_options(p)

    p = add("audit", _cmd_audit, "what the node received, decided, measured and sent")
    _node_options(p)
    p.add_argument("--series", metavar="UID", help="show one series in full")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--csv", metavar="FILE", help="export the series list as CSV ('-' for stdout)")
    p.add_argument("--limit", type=int, default=50, help="most recent N series (default 50)")
    p.add_argument("--actions", action="store_true",
                   help="what operators did (rerun, outbox retry, measuring, reindex)")
    p.add_argument("--refusals", action="store_true",
                   help="list refused and aborted connections and refused instances (with --json: as JSON)")

    p = add("measure", _cmd_measure, "measure on a CT and liver mask already on the 0.7 x 0.7 x 2.5 mm grid")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--ct", required=True, help="CT NIfTI (HU)")
    p.add_argument("--liver-mask", required=True, help="liver mask NIfTI on the same grid")
    p.add_argument("--spleen-mask", help="optional spleen mask NIfTI on the same grid")
    p.add_argument("--roi-out", help="write the ROI mask here (NIfTI)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("process", _cmd_process, "load, resample, segment and measure the CT series in a folder")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("input", metavar="DIR", help="folder of DICOM files (searched recursively)")
    _model_options(p)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="inference device")
    p.add_argument("--out", help="write CT, masks, ROI (NIfTI) and a preview PNG per series here")
    p.add_argument("--dicom-out", action="store_true", help="also write SEG, SR and key image to --out")
    p.add_argument("--json", action="store_true", help="print one JSON object per series")

    p = add("demo", _cmd_demo, "end-to-end demo on loopback: phantom CT in, SEG + SR + key image out")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--data-dir", help="working folder, kept afterwards (default: a new temporary folder)")
    p.add_argument("--hu", type=float, default=30.0, help="true liver attenuation of the phantom (HU)")

    p = add("doctor", _cmd_doctor, "check device, model, destinations, disk space and database")
    _node_options(p)
    _model_options(p)
    p.add_argument("--liveness", action="store_true",
                   help="only check that the node's DICOM listener answers (the container health check)")

    p = add("outbox", _cmd_outbox, "list or retry result deliveries")
    _node_options(p)
    p.add_argument("action", choices=["list", "retry"], help="list deliveries, or requeue dead ones")
    p.add_argument("--id", type=int, action="append", help="only these delivery ids (retry)")
    p.add_argument("--destination", dest="retry_to", action="append", metavar="AET@HOST:PORT",
                   help="retry: send to this destination instead of the configured ones (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("rerun", _cmd_rerun, "evaluate and measure series again (the running node picks them up)")
    _node_options(p)
    p.add_argument("--series", action="append", metavar="UID", help="this series (repeatable)")
    p.add_argument("--failed", action="store_true", help="every series whose measurement failed")

    p = add("measuring", _cmd_measuring, "suspend or resume measuring on the running node (queued jobs wait; "
                                         "receiving and sending go on)")
    _node_options(p)
    p.add_argument("action", choices=["suspend", "resume"])

    p = add("reindex", _cmd_reindex, "rebuild the audit index from the spool (node stopped; never re-sends "
                                     "delivered results)")
    _node_options(p)

    p = add("model", _cmd_model_verify, "model management")
    p.add_argument("action", choices=["verify"], help="verify: check that a folder is a loadable nnU-Net model")
    p.add_argument("folder", help="nnU-Net v2 model folder, or nnU-Net v1 result folder (or its RESULTS_FOLDER)")
    p.add_argument("--profile", help="label profile name or TOML file")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("phantom", _cmd_phantom, "write a synthetic chest CT series (DICOM) with its ground-truth masks")
    p.add_argument("out", help="output folder")
    p.add_argument("--hu", type=float, default=55.0, help="true liver attenuation (HU)")
    p.add_argument("--slices", type=int, default=0, help="number of slices (0: default)")
    p.add_argument("--feet-first", action="store_true", help="feet-first acquisition")
    p.add_argument("--contrast", action="store_true", help="label it contrast-enhanced")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lpm-node``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"lpm-node {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    """Bad settings, paths or inputs, and the node's own errors: their message is meant for the user."""
    return isinstance(exc, (ValueError, OSError)) or type(exc).__module__.startswith("lpm_node.")


if __name__ == "__main__":
    sys.exit(main())
