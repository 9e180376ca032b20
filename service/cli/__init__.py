"""The ``clusca`` command: ``serve``, ``api``, ``worker``, ``generate`` (:mod:`.main`) and
``tune`` (:mod:`.tune`)."""

from service.cli.main import main

__all__ = ["main"]
