"""User-facing errors: the CLI prints their message (no traceback unless --debug) and exits 2."""


class UserError(Exception):
    """Something the user can fix; the message names the problem and the fix."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ResourceError(UserError):
    pass


class RunExistsError(UserError):
    pass


class CheckpointError(UserError):
    pass


class AddressError(UserError):
    """A cluster address (--address, RAY_ADDRESS) that is malformed or has no Ray cluster behind it."""
