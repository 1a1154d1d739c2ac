"""`python -m camelid.serve [MODEL] [flags]`: the same as `camelid serve`."""

import argparse
import sys

from . import add_arguments, main

parser = argparse.ArgumentParser(prog="camelid serve", description="Serve a model over an OpenAI-compatible HTTP API.")
add_arguments(parser)
sys.exit(main(parser.parse_intermixed_args()))  # options before or after MODEL
