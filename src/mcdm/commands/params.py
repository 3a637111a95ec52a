"""`mcdm params apply <profile>` / `show` / `check`: the one documented way to switch profiles
(default | micro | paper | quality) and to validate params.yaml."""
from __future__ import annotations

import argparse
import sys

from mcdm.commands.args import Command
from mcdm.config import PROFILES, apply_profile, dump_params, load_params
from mcdm.media.files import write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    apply = actions.add_parser("apply", help="write params.yaml = schema defaults + configs/<profile>.yaml")
    apply.add_argument("profile", choices=PROFILES)
    apply.add_argument("--out", default=None, help="file to write (default: --params, i.e. params.yaml)")
    actions.add_parser("show", help="print the validated params")
    check = actions.add_parser("check", help="validate params.yaml and print its hash")
    check.add_argument("--record", default=None,
                       help="also write this marker file (the params_check DVC stage: its content never changes, "
                            "so a valid edit re-runs only the stages whose params changed)")


def run(_, args) -> None:
    if args.action == "apply":
        out = args.out or args.params
        params = apply_profile(args.profile, out)
        print(f"wrote {out} from profile {args.profile!r} (params hash {params.hash()})")
    elif args.action == "show":
        sys.stdout.write(dump_params(load_params(args.params)))
    else:
        params = load_params(args.params)
        if args.record:
            write_text(f"{args.params} validated by `mcdm params check`\n", args.record)
        print(f"{args.params}: ok (variant={params.variant}, alpha={params.alpha}, hash {params.hash()})")


COMMAND = Command(run, needs_params=False, add_arguments=add_arguments)
