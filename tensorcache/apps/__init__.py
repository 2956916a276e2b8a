"""The programs built on the library, kept out of its core.

The ``tensorcache`` command (``cli``, with ``statview`` for what ``stat``
prints), the local-cluster launcher (``cluster``), the private-etcd launcher
(``etcdserver``), the demo (``demo/``) and the child-process plumbing they
share (``parentdeath``). Nothing in the library imports this package
(pyproject.toml's import-linter contracts, checked by ``make test``).
"""
