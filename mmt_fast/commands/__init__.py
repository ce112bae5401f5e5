"""The ``mmt-fast`` commands (dispatched by :mod:`mmt_fast.cli`): each module here is one
command built on the library (models, data, inference, training); nothing in the library
imports from this package."""
