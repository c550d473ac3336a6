"""``python -m fluidfs`` runs the command line."""

from fluidfs.cli import main

main()
