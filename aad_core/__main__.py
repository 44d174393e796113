"""``python -m aad_core`` runs the ``aad`` command line."""

from aad_core.cli import main

main()
