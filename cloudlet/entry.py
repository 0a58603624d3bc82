"""The `cloudlet` console script: `cloudlet unit run ...` starts a unit without loading the
whole command line (`cloudlet.unit_run`); everything else is `cloudlet.cli`."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["unit", "run"] and not {"--help", "-h"} & set(argv):
        from cloudlet.unit_run import main as unit_run

        sys.exit(unit_run(argv[2:]))
    from cloudlet.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
