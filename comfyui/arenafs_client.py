"""A small client of the arenafs control API (HTTP over a unix socket), standard library only.

The package holds no cache logic: everything it shows or does is a request to the daemon that
serves ComfyUI's models/ directory.
"""

import http.client
import json
import os
import socket

SOCKET_DIR = "/run/arenafs"
TIMEOUT = 5.0


def systemd_escape_path(path):
    """The daemon's name for a mount point (systemd-escape --path), as src/mount.rs spells it."""
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    if not parts:
        return "-"
    out = []
    for i, c in enumerate(b"/".join(parts)):
        ch = chr(c)
        if c == ord("/"):
            out.append("-")
        elif c == ord(".") and i == 0:
            out.append("\\x2e")
        elif (ch.isascii() and ch.isalnum()) or ch in ":_.":
            out.append(ch)
        else:
            out.append("\\x%02x" % c)
    return "".join(out)


def find_socket(models_dir):
    """The daemon's socket and how it was found: ARENAFS_SOCKET, else the default socket of the
    arenafs mount that serves models_dir."""
    env = os.environ.get("ARENAFS_SOCKET")
    if env:
        return env, "ARENAFS_SOCKET"
    real = os.path.realpath(models_dir)
    return os.path.join(SOCKET_DIR, systemd_escape_path(real) + ".sock"), f"the mount at {real}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class DaemonError(Exception):
    """The daemon answered with an error (`code` is its error code), or did not answer
    (`code` is "UNREACHABLE")."""

    def __init__(self, code, message, status=None, body=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.body = body or {}


class Client:
    def __init__(self, path, timeout=TIMEOUT):
        self.path = path
        self.timeout = timeout

    def call(self, method, target, body=None, raw=None):
        """One request; returns the decoded JSON answer or raises DaemonError."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            headers = {}
            payload = raw
            if body is not None:
                payload = json.dumps(body).encode()
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, target, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            raise DaemonError("UNREACHABLE", f"arenafs is not reachable at {self.path}: {e}") from e
        finally:
            conn.close()
        try:
            answer = json.loads(data)
        except ValueError:
            raise DaemonError("BAD_ANSWER", f"not JSON: {data[:200]!r}", resp.status) from None
        if resp.status >= 400 or answer.get("status") == "error":
            raise DaemonError(answer.get("code", "ERROR"), answer.get("message", ""), resp.status, answer)
        return answer

    def get(self, target):
        return self.call("GET", target)

    def post(self, target, body):
        return self.call("POST", target, body)
