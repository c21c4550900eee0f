"""Demo and test helpers: synthetic CT phantoms, local PACS and PostgreSQL helpers and the bundled phantom-trained
model.

Only ``lpm_node.cli`` (the ``demo`` and ``phantom`` commands, ``--demo-model``) and the tests use this package;
nothing on the product path imports it.
"""
