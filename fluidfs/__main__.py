"""``python -m fluidfs`` runs the command line."""

from fluidfs.cli.main import main

main()
