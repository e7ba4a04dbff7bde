"""Thin entry points, one per recipe stage: `python -m capsv.bin.<name> --help`."""
