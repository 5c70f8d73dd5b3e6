"""python -m fusedgpt ... is the `fusedgpt` command."""

from fusedgpt.cli import main

raise SystemExit(main())
