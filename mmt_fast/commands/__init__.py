"""The ``mmt-fast`` commands (dispatched by :mod:`mmt_fast.cli`): one module per command,
named after it (``check-data`` -> ``check_data``), each with ``HELP``, ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> exit code``. At import time a command module
uses only the standard library and :mod:`mmt_fast.errors`; ``run`` imports the library
(:mod:`mmt_fast.run`, :mod:`mmt_fast.inference`, :mod:`mmt_fast.tools`, the trainer).
Nothing in the library imports from this package."""
