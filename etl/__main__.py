"""`python -m etl ...` and `spark-submit etl/__main__.py ...` run the ETL CLI (see HowToRun.md)."""
import argparse
import sys

from common.logs import setup_logging
from etl import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bigticket etl")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
