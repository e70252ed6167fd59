"""Where data lives: local paths and fsspec URLs, and what went wrong there.

Everything that touches a file system goes through :func:`fs_and_path`, and
everything that can fail because of the user's input (a missing file, a
bucket that does not exist, wrong credentials) is wrapped in
:func:`user_errors`, so the user sees one line instead of a library traceback.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re

import fsspec
from fsspec.core import split_protocol

from ..errors import InputError

__all__ = [
    "describe_error",
    "exists",
    "fs_and_path",
    "is_local",
    "join",
    "kind_of",
    "local_path",
    "remove",
    "strip_suffix",
    "user_errors",
]

_LOCAL_PROTOCOLS = (None, "file", "local")


def is_local(url) -> bool:
    """True for a plain path or a ``file://`` URL.

    Parameters
    ----------
    url : str or os.PathLike

    Returns
    -------
    bool
    """
    protocol, _ = split_protocol(os.fspath(url))
    return protocol in _LOCAL_PROTOCOLS


def local_path(url) -> str:
    """The absolute local path of a plain path or ``file://`` URL.

    Parameters
    ----------
    url : str or os.PathLike

    Returns
    -------
    str
    """
    url = os.fspath(url)
    if not is_local(url):
        raise InputError(f"{url}: not a local path")
    _, path = split_protocol(url)
    return os.path.abspath(os.path.expanduser(path))


def fs_and_path(url, storage_options=None):
    """The fsspec file system and the path inside it for ``url``.

    Parameters
    ----------
    url : str or os.PathLike
        A local path, or a URL such as ``file://``, ``s3://``, ``gs://``.
    storage_options : dict, optional
        Passed to the file system (credentials, ``client_kwargs``, ...).
        Ignored for local paths.

    Returns
    -------
    fs : fsspec.AbstractFileSystem
    path : str
    """
    url = os.fspath(url)
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    with user_errors(url):
        return fsspec.core.url_to_fs(url, **(storage_options or {}))


def kind_of(url) -> str:
    """What ``url`` holds, from its extension: ``'nifti'`` or ``'zarr'``.

    Parameters
    ----------
    url : str or os.PathLike
        ``.nii`` and ``.nii.gz`` are NIfTI; ``.zarr`` (a trailing slash is
        allowed) is a Zarr store.

    Returns
    -------
    str

    Raises
    ------
    InputError
        For any other extension.
    """
    name = os.fspath(url).rstrip("/").lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".zarr"):
        return "zarr"
    raise InputError(
        f"{os.fspath(url)}: unknown file type; expected a name ending in .nii, "
        ".nii.gz or .zarr"
    )


def strip_suffix(url) -> str:
    """``url`` without its ``.nii``/``.nii.gz``/``.zarr`` extension."""
    url = os.fspath(url).rstrip("/")
    for suffix in (".nii.gz", ".nii", ".zarr"):
        if url.lower().endswith(suffix):
            return url[: -len(suffix)]
    return url


def join(url, name: str) -> str:
    """``name`` inside the folder or prefix ``url`` (a URL stays a URL)."""
    url = os.fspath(url)
    if is_local(url):
        return os.path.join(local_path(url), name)
    return posixpath.join(url.rstrip("/"), name)


def exists(url, storage_options=None) -> bool:
    """Whether a file, folder or prefix exists at ``url``."""
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url):
        # object-store listings are cached per file system instance; another
        # instance (e.g. Zarr's asynchronous one) may have written since
        fs.invalidate_cache(path)
        return fs.exists(path)


def remove(url, storage_options=None) -> None:
    """Delete ``url`` (recursively for a folder); no error if it is absent."""
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url):
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def user_errors(url, action: str = ""):
    """Turn file system errors caused by the user's input into InputError.

    Parameters
    ----------
    url : str
        Named in the message.
    action : str, optional
        What was being done, e.g. ``"reading"``; named in the message.

    Raises
    ------
    InputError
        With a one-line message, chained to the original exception. Errors
        that :func:`describe_error` does not recognise pass through unchanged:
        those are bugs, and their traceback is the useful thing.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        where = f"{action} {os.fspath(url)}" if action else os.fspath(url)
        raise InputError(f"{where}: {message}") from exc


# botocore's error codes, for errors that reach us without s3fs's translation
_S3_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such file or object",
    "404": "no such file or object",
    "AccessDenied": "access denied",
    "403": "access denied (check the credentials and permissions)",
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the access key id is not valid (check the credentials)",
    "SignatureDoesNotMatch": "the secret key is wrong (check the credentials)",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is not valid",
}


def describe_error(exc: BaseException) -> str | None:
    """A one-line, user-facing description of a storage error, or None.

    The exception itself is tried first, then what it wraps: its
    ``__cause__``, its ``__context__`` (unless suppressed with ``from None``)
    and the members of an exception group, since Zarr's and fsspec's async
    machinery and Dask may re-raise a storage error inside another one.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str or None
        None when the error is not one a user can cause or fix.
    """
    for inner in _chain(exc):
        message = _describe_one(inner)
        if message is not None:
            return message
    return None


def _chain(exc: BaseException):
    """``exc``, then the exceptions it wraps, breadth first, each once."""
    seen, queue = set(), [exc]
    while queue:
        exc = queue.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        queue.append(exc.__cause__)
        if not exc.__suppress_context__:
            queue.append(exc.__context__)
        queue.extend(getattr(exc, "exceptions", None) or ())


# base classes (by name, so that botocore and aiohttp need not be imported)
# of errors that mean the storage service could not be reached or answered
# unusably; Python's own ConnectionError (not matched: only classes outside
# builtins are) is left to the errno branch, as it also covers local pipes
_CONNECTION_ERRORS = {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError",
                      "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError",
                      "HTTPClientError", "ProxyConnectionError", "ConnectionClosedError"}
_TIMEOUT_ERRORS = {"FSTimeoutError", "ReadTimeoutError", "ServerTimeoutError", "TimeoutError"}


def _class_names(exc: BaseException) -> set:
    return {k.__name__ for k in type(exc).__mro__
            if k.__module__ != "builtins" or k.__name__ == "TimeoutError"}


_STORAGE_LIBRARIES = ("s3fs", "aiobotocore", "botocore", "fsspec", "gcsfs", "adlfs")


def _raised_in_storage_library(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a storage library (not our code)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    parts = set(re.split(r"[\\/]", last or ""))
    return bool(parts & set(_STORAGE_LIBRARIES))


def _describe_one(exc: BaseException) -> str | None:
    """:func:`describe_error` for ``exc`` alone, not what it wraps."""
    code = _client_error_code(exc)
    if code in _S3_CODES:
        return _S3_CODES[code]
    name = type(exc).__name__
    text = _one_line(exc)
    lowered = text.lower()
    names = _class_names(exc)
    if isinstance(exc, TypeError) and "keyword argument" in lowered \
            and _raised_in_storage_library(exc):
        # a storage option the file system does not take: the user's input
        return f"a storage option is not accepted by the file system ({text})"
    if name == "NoCredentialsError" or "unable to locate credentials" in lowered:
        return ("no credentials found: pass storage_options (e.g. key/secret, or "
                "anon=True) or set the usual environment variables")
    if names & _TIMEOUT_ERRORS:
        return f"the storage service did not answer in time ({text or name})"
    if names & _CONNECTION_ERRORS:
        return f"cannot connect to the storage service ({text or name})"
    if isinstance(exc, FileNotFoundError):
        if "bucket" in lowered:
            return "the bucket does not exist"
        return "no such file or directory"
    if isinstance(exc, PermissionError):
        if "access key" in lowered:
            return "the access key id is not valid (check the credentials)"
        if "signature" in lowered:
            return "the secret key is wrong (check the credentials)"
        return f"permission denied ({text})" if text else "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if isinstance(exc, FileExistsError):
        return "already exists"
    if isinstance(exc, ImportError) and "install" in lowered:
        # fsspec's way of saying e.g. that gs:// needs gcsfs
        return text
    if isinstance(exc, ValueError) and lowered.startswith("protocol not known"):
        return f"unknown URL protocol ({text})"
    if isinstance(exc, OSError) and exc.errno is not None:
        # ENOSPC, EDQUOT, EIO, EROFS...: the system's own words are the clearest
        return exc.strerror or text
    return None


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError in ``exc``'s chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()
