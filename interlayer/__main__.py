"""``python -m interlayer`` runs the same command line as the ``interlayer`` console script."""

from interlayer.cli import main

main()
