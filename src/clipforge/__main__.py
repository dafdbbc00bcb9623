"""``python -m clipforge``: the same as the ``clipforge`` command."""

from clipforge.cli import main

main()
