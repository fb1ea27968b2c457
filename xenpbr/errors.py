"""The root of xenpbr's exception hierarchy.

Every error xenpbr raises on purpose derives from :class:`XenpbrError`, so an operator
tool can catch "anything xenpbr decided was wrong" in one place while genuine bugs
(``TypeError``, ``AttributeError`` ...) still surface as tracebacks. Each concern's module
defines its own subclasses next to the code that raises them; messages say what failed
and what to do about it.
"""


class XenpbrError(Exception):
    """Base class of every error xenpbr raises deliberately."""
