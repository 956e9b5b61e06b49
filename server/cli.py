"""`fedtune-server`: the coordinator operator's command (certificates, sites, runs, export).

None of its subcommands exists yet; each names the issue that brings it, so that no
operator mistakes a placeholder for a working step. Until then a coordinator runs the app
with `flwr run`, and resumes a run with `--run-config "federation.resume='/abs/RUN_DIR'"`.
"""

from __future__ import annotations

import argparse
import sys

PLANNED = {
    "run": ("submit a federated run from a config and follow it", 4),
    "resume": ("resume a run from its last checkpoint after a crash", 4),
    "ca": ("create a certificate authority and server certificate", 4),
    "register": ("register a site's public key", 4),
    "start": ("start the SuperLink with TLS and site authentication", 4),
    "sites": ("list registered sites", 4),
    "export": ("export a global adapter or a merged model", 9),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedtune-server`."""
    parser = argparse.ArgumentParser(prog="fedtune-server", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (purpose, issue) in PLANNED.items():
        commands.add_parser(name, help=f"{purpose} (not implemented yet: issue #{issue})")
    args = parser.parse_args(argv)
    purpose, issue = PLANNED[args.command]
    print(
        f"fedtune-server {args.command}: not implemented yet ({purpose}); it arrives with "
        f"issue #{issue}. Nothing was done.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
