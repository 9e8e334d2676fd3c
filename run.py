#!/usr/bin/env python3
"""BIDS-Apps entry point: ``run.py BIDS_DIR OUTPUT_DIR {participant,group} [options]``."""
from bids_siamese.cli.main import entry

if __name__ == "__main__":
    entry()
