"""The database engines numbering supports, one module each, and the registry of them.

Everything that differs between engines lives in its backend (:mod:`.base` says what a
backend provides; :mod:`.postgresql` and :mod:`.sqlite` are the engines; :mod:`.psycopg2`
is PostgreSQL's pipelined executor). The rest of numbering asks the registry:

>>> backend_for("sqlite:///numbering.db").label
'SQLite'

Settings validation reads the same registry (:func:`names`), so an engine is supported
everywhere or nowhere. A new engine is a :class:`~.base.Backend` subclass in a module of
its own, added to ``_ENGINES`` below.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from numbering.backends.base import Backend, ConsumerLock
from numbering.backends.mysql import MySQL
from numbering.backends.postgresql import PostgreSQL
from numbering.backends.sqlite import SQLite
from numbering.errors import NumberingError

__all__ = [
    "Backend",
    "ConsumerLock",
    "UnsupportedDatabase",
    "backend_for",
    "backend_named",
    "classify",
    "names",
    "normalize_url",
]

_ENGINES: dict[str, Backend] = {
    backend.name: backend for backend in (PostgreSQL(), SQLite(), MySQL())
}
# SQLAlchemy names MariaDB's dialect "mariadb": the same engine.
_ENGINES["mariadb"] = _ENGINES["mysql"]


class UnsupportedDatabase(ValueError):
    """A URL names a database numbering has no backend for."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unsupported database {name!r}; numbering supports {', '.join(names())}")
        self.name = name


def names() -> tuple[str, ...]:
    """The SQLAlchemy backend names numbering supports."""
    return tuple(_ENGINES)


def backend_named(name: str) -> Backend:
    """The backend for SQLAlchemy backend name ``name`` (:class:`UnsupportedDatabase`)."""
    try:
        return _ENGINES[name]
    except KeyError:
        raise UnsupportedDatabase(name) from None


def normalize_url(url: str) -> str:
    """``url`` with another spelling of its scheme (``postgres://``) rewritten."""
    for backend in _ENGINES.values():
        for alias, canonical in backend.url_aliases.items():
            if url.startswith(alias):
                return canonical + url.removeprefix(alias)
    return url


def backend_for(bind: Engine | Connection | Session | URL | str) -> Backend:
    """The backend of an engine, a connection, an ORM session or a URL."""
    if isinstance(bind, str):
        bind = make_url(normalize_url(bind))
    if isinstance(bind, URL):
        return backend_named(bind.get_backend_name())
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return backend_named(engine.dialect.name)


def classify(exc: sa.exc.DBAPIError, detail: str) -> NumberingError | None:
    """numbering's error for a driver error, from the engine that raised it."""
    for backend in _ENGINES.values():
        found = backend.classify(exc, detail)
        if found is not None:
            return found
    return None
