"""`mcdm params apply|show|check`: write params.yaml from the schema and a profile, or validate it."""
from __future__ import annotations

import sys

from mcdm.config import PROFILES, apply_profile, dump_params, load_params


def register(sub) -> None:
    p = sub.add_parser("params", help="apply a params profile (default | micro | paper), show or check params.yaml")
    ps = p.add_subparsers(dest="action", required=True)
    a = ps.add_parser("apply", help="write params.yaml = schema defaults + configs/<profile>.yaml")
    a.add_argument("profile", choices=PROFILES)
    a.add_argument("--out", default=None, help="file to write (default: --params, i.e. params.yaml)")
    ps.add_parser("show", help="print the validated params")
    ps.add_parser("check", help="validate params.yaml and print its hash")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "apply":
        out = args.out or args.params
        params = apply_profile(args.profile, out)
        print(f"wrote {out} from profile {args.profile!r} (params hash {params.hash()})")
    elif args.action == "show":
        sys.stdout.write(dump_params(load_params(args.params)))
    else:
        params = load_params(args.params)
        print(f"{args.params}: ok (variant={params.variant}, alpha={params.alpha}, hash {params.hash()})")
    return 0
