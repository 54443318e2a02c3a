"""``raymia`` command line.

    raymia audit CONFIG [--set key=value ...] [--local]    run a privacy audit (--local: in this process, no Ray)
    raymia validate CONFIG [--set key=value ...]           check a config without running anything
    raymia rescore RUN_ID [--set attacks.x=y ...]          re-score a finished audit from its stored model outputs
    raymia diffusion-audit CONFIG [--set ...] [--validate] [--local]   audit diffusion models (undefended / DualMD /
                                                           DistillMD)

Exit codes: 0 success, 2 a problem in the user's input (message names the field and the fix), 1 a bug.
"""

from __future__ import annotations

import argparse
import sys

from raymia.allocator import reexec_with_allocator_env
from raymia.errors import UserError
from raymia.quiet import quiet_defaults

EXIT_USER_ERROR = 2
LOCAL_HELP = ("run everything in this process, one model after another, without Ray (nothing imports it): for a "
              "notebook, a debugger or a machine without Ray; same results as the Ray run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymia", description="Membership-inference audits on Ray, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("audit", "run a privacy audit described by a YAML config"),
                        ("validate", "check a config without running anything")]:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="path of the YAML config, e.g. configs/quickstart.yaml")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set reference.count=32 (repeatable)")
        if name == "validate":
            c.add_argument("--no-estimate", action="store_true",
                           help="skip the short timed calibration behind the wall-time estimate")
        if name == "audit":
            c.add_argument("--local", action="store_true", help=LOCAL_HELP)
            c.add_argument("--repeat", type=int, default=None, metavar="N",
                           help="audit every configuration under N seeds (seed, seed+1, ...) and report mean ± sd "
                                "across them (the config's seeds: [...] does the same)")
    d = sub.add_parser("diffusion-audit", help="audit diffusion models: undefended, DualMD and DistillMD DDPMs "
                                               "under loss / SecMI / PIA attacks, with FID")
    d.add_argument("config", help="path of the YAML config, e.g. configs/diffusion-quickstart.yaml")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=500 (repeatable)")
    d.add_argument("--validate", action="store_true", help="check the config and exit without running anything")
    d.add_argument("--local", action="store_true", help=LOCAL_HELP)
    r = sub.add_parser("rescore", help="re-score a finished audit from its stored outputs, without retraining")
    r.add_argument("run_id", help="the MLflow parent run id an audit printed")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="attacks.KEY=VALUE",
                   help="change an attack knob, e.g. --set attacks.rmia.gamma=1 (repeatable)")
    r.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the run (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script: restart once with the allocator settings (raymia.allocator)
        reexec_with_allocator_env()
    args = _parser().parse_args(argv)
    quiet_defaults()
    try:
        if args.command == "diffusion-audit":
            from raymia.config import DiffusionAuditConfig, load_config

            dcfg = load_config(args.config, args.overrides, schema=DiffusionAuditConfig)
            if args.validate:
                print(f"{args.config}: OK (systems {', '.join(dcfg.defenses.enabled)}; attacks "
                      f"{', '.join(dcfg.attacks.enabled)}; {dcfg.train.steps} training steps per DDPM)")
                return 0
            from raymia.diffusion_audit import run_diffusion_audit

            outcome = run_diffusion_audit(dcfg, local=args.local)
        elif args.command == "rescore":
            from raymia.audit import rescore_run

            outcome = rescore_run(args.run_id, args.overrides, tracking_uri=args.tracking_uri)
        else:
            from raymia.config import load_config

            cfg = load_config(args.config, args.overrides)
            if getattr(args, "repeat", None) is not None:
                if args.repeat < 1:
                    raise UserError(f"--repeat {args.repeat}: give a number of seeds >= 1, e.g. --repeat 3")
                cfg = cfg.model_copy(update={"seeds": list(range(cfg.seed, cfg.seed + args.repeat))})
            if args.command == "validate":
                from raymia.audit import validate_audit

                print(validate_audit(cfg, source=args.config, calibrate=not args.no_estimate))
                return 0
            from raymia.audit import run_audit

            outcome = run_audit(cfg, local=args.local)
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
