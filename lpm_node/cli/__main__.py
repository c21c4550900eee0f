"""``python -m lpm_node.cli``: the same as the ``lpm-node`` command."""

from lpm_node.cli.main import main

raise SystemExit(main())
