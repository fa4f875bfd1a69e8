"""The error every configuration check raises, and how a full disk is told
from other write errors."""
import errno


class ConfigError(ValueError):
    """A configuration mistake, found before any model is loaded."""


# How writers that do not raise OSError report a full disk: safetensors'
# SafetensorError and torch's zip writer (RuntimeError) name it in the text.
DISK_FULL_TEXT = ('No space left on device', 'StorageFull', 'file write failed')


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in DISK_FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False
