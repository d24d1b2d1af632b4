"""The one error every `oprecon` command raises when it cannot do its work."""


class CannotStart(Exception):
    """Raised for anything that stops a command before it did its work."""
