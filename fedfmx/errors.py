"""The project's exceptions: the CLI turns each into one line that says what to fix."""


class FedFMXError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(FedFMXError):
    """A configuration file or value is invalid."""


class DataError(FedFMXError):
    """A data set is missing, unreadable or inconsistent."""


class ProtocolError(FedFMXError):
    """A message or payload is malformed, hostile or does not fit the receiver's state."""
