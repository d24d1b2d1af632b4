"""The one error every `oprecon` command raises when it cannot do its work."""

from worker.runtime.operations import OperationRefused


class CannotStart(OperationRefused):
    """Raised for anything that stops a command before it did its work (the shared
    operations under worker/runtime raise its base, which the CLI reports the same way)."""
