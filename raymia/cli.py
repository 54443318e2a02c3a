"""``raymia`` command line: ``raymia audit CONFIG`` runs a privacy audit; ``raymia validate CONFIG`` checks one.

Exit codes: 0 success, 2 a problem in the user's input (message names the field and the fix), 1 a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raymia.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymia", description="Membership-inference audits on Ray, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("audit", "run a privacy audit described by a YAML config"),
                        ("validate", "check a config without running anything")]:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="path of the YAML config, e.g. configs/quickstart.yaml")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set shadows.count=4 (repeatable)")
    return p


def quiet_defaults() -> None:
    """Offline-friendly defaults a user can still override through the environment."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for noisy in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_defaults()
    try:
        from raymia.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(f"{args.config}: OK ({len(cfg.targets)} targets, {cfg.shadows.count} shadows each, "
                  f"attacks {', '.join(cfg.attacks.enabled)})")
            return 0
        from raymia.audit import run_audit

        outcome = run_audit(cfg)
    except UserError as err:
        print(f"raymia: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("raymia: interrupted", file=sys.stderr)
        return 130
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
