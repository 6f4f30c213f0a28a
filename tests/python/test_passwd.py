"""`tern passwd`: the password file it writes, and compatibility with Mosquitto's own tools.

Cross-checks need `mosquitto_passwd` and `/usr/sbin/mosquitto` (Debian package `mosquitto`) and
`mosquitto_pub` (`mosquitto-clients`); they are skipped, with the reason, when not installed.
The Mosquitto broker started here listens on a free loopback port, never 1883.
"""
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from conftest import TERN_BIN

LINE7 = re.compile(r"^([^:]+):\$7\$101\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)$")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
)
MOSQUITTO_PUB = shutil.which("mosquitto_pub")

needs_mosquitto_passwd = pytest.mark.skipif(
    MOSQUITTO_PASSWD is None,
    reason="mosquitto_passwd not installed (apt-get install mosquitto)",
)


def tern_passwd(*args, stdin=b""):
    return subprocess.run(
        [TERN_BIN, "passwd", *args],
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=30,
    )


def check(path, user, password):
    """Exit code of `tern passwd --check`: 0 = right password, 1 = wrong, 2 = error."""
    return tern_passwd("--check", path, user, stdin=password + b"\n").returncode


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="tern-passwd-") as d:
        yield d


def test_creates_file_private_in_mosquitto_format(tmp):
    path = os.path.join(tmp, "passwd")
    r = tern_passwd(path, "alice", stdin=b"s3cret\n")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = open(path).read().splitlines()
    assert len(lines) == 1
    assert LINE7.match(lines[0]), lines[0]
    assert check(path, "alice", b"s3cret") == 0
    assert check(path, "alice", b"s3cre") == 1
    assert check(path, "alice", b"s3cret ") == 1  # only the line ending is stripped
    assert check(path, "bob", b"s3cret") == 1
    assert os.listdir(tmp) == ["passwd"], "no temporary file left behind"


def test_update_keeps_order_comments_and_mode(tmp):
    path = os.path.join(tmp, "passwd")
    for user, pw in [("a", b"1"), ("b", b"2"), ("c", b"3")]:
        assert tern_passwd(path, user, stdin=pw + b"\n").returncode == 0
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write("# managed by hand\n\n" + text)
    os.chmod(path, 0o640)
    assert tern_passwd(path, "b", stdin=b"two\r\n").returncode == 0
    assert tern_passwd(path, "d", stdin=b"4").returncode == 0  # no newline at EOF
    lines = open(path).read().splitlines()
    assert lines[:2] == ["# managed by hand", ""]
    assert [l.split(":")[0] for l in lines[2:]] == ["a", "b", "c", "d"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, "existing mode kept"
    assert check(path, "b", b"two") == 0
    assert check(path, "b", b"2") == 1
    assert check(path, "d", b"4") == 0
    assert check(path, "a", b"1") == 0


def test_refuses_empty_password_and_bad_username(tmp):
    path = os.path.join(tmp, "passwd")
    r = tern_passwd(path, "alice", stdin=b"\n")
    assert r.returncode != 0
    assert b"empty password" in r.stderr
    r = tern_passwd(path, "alice", stdin=b"")
    assert r.returncode != 0
    r = tern_passwd(path, "al:ice", stdin=b"pw\n")
    assert r.returncode != 0
    assert b"invalid username" in r.stderr
    assert not os.path.exists(path)


def test_delete(tmp):
    path = os.path.join(tmp, "passwd")
    for user in ["a", "b"]:
        assert tern_passwd(path, user, stdin=b"pw\n").returncode == 0
    assert tern_passwd("-D", path, "a").returncode == 0
    assert [l.split(":")[0] for l in open(path).read().splitlines()] == ["b"]
    r = tern_passwd("-D", path, "a")
    assert r.returncode != 0
    assert b"no user" in r.stderr
    assert check(path, "b", b"pw") == 0


def test_malformed_file_names_the_line_and_is_left_alone(tmp):
    path = os.path.join(tmp, "passwd")
    assert tern_passwd(path, "a", stdin=b"pw\n").returncode == 0
    with open(path, "a") as f:
        f.write("# comment\nbob:plaintext\n")
    before = open(path).read()
    r = tern_passwd(path, "c", stdin=b"pw\n")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert path in err and "line 3" in err, err
    assert open(path).read() == before
    assert check(path, "a", b"pw") == 2


def users(path):
    return [l.split(":")[0] for l in open(path).read().splitlines() if l and l[0] != "#"]


def test_create_flag_replaces_the_file(tmp):
    """-c, as mosquitto_passwd -c: a file with only this user, whatever was there."""
    path = os.path.join(tmp, "passwd")
    for user in ["a", "b"]:
        assert tern_passwd(path, user, stdin=b"pw\n").returncode == 0
    os.chmod(path, 0o640)
    r = tern_passwd("-c", path, "c", stdin=b"c-pw\n")
    assert r.returncode == 0, r.stderr
    assert users(path) == ["c"]
    assert check(path, "c", b"c-pw") == 0
    assert check(path, "a", b"pw") == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, "existing mode kept"
    fresh = os.path.join(tmp, "fresh")
    assert tern_passwd("-c", "-b", fresh, "d", "d-pw").returncode == 0
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
    assert users(fresh) == ["d"]


def test_batch_flag_takes_the_password_and_warns(tmp):
    path = os.path.join(tmp, "passwd")
    r = tern_passwd("-b", path, "alice", "w0nder land")
    assert r.returncode == 0, r.stderr
    assert b"shell's history" in r.stderr, r.stderr
    assert check(path, "alice", b"w0nder land") == 0
    # A password that looks like an option goes after `--`, as clap says.
    assert tern_passwd("-b", path, "bob", "--", "-dash-").returncode == 0
    assert check(path, "bob", b"-dash-") == 0
    r = tern_passwd("-b", path, "carol")
    assert r.returncode == 2
    assert b"-b expects FILE USER PASSWORD, not 2 arguments" in r.stderr, r.stderr
    r = tern_passwd("-b", path, "carol", "")
    assert r.returncode != 0
    assert b"empty password" in r.stderr
    assert users(path) == ["alice", "bob"]


def test_upgrade_hashes_plain_text_passwords(tmp):
    """-U, as mosquitto_passwd -U: `user:password` lines hashed in place; hashed lines,
    comments and blank lines kept; nothing written unless every line is understood."""
    path = os.path.join(tmp, "passwd")
    assert tern_passwd("-b", path, "carol", "c4rol").returncode == 0
    carol = open(path).read()
    with open(path, "w") as f:
        f.write("# users\nalice:wonder land\n\nbob:b0b:with colon\n" + carol)
    os.chmod(path, 0o640)
    r = tern_passwd("-U", path)
    assert r.returncode == 0, r.stderr
    assert b"2 plain-text passwords hashed" in r.stderr, r.stderr
    lines = open(path).read().splitlines()
    assert lines[0] == "# users" and lines[2] == "" and lines[4] == carol.strip()
    assert LINE7.match(lines[1]) and LINE7.match(lines[3]), lines
    assert check(path, "alice", b"wonder land") == 0
    assert check(path, "bob", b"b0b:with colon") == 0
    assert check(path, "carol", b"c4rol") == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    # Again: nothing left to hash, nothing changed.
    before = open(path).read()
    r = tern_passwd("-U", path)
    assert r.returncode == 0 and b"0 plain-text passwords" in r.stderr
    assert open(path).read() == before
    # A line without a password: the file is left alone.
    with open(path, "a") as f:
        f.write("dave\n")
    before = open(path).read()
    r = tern_passwd("-U", path)
    assert r.returncode != 0
    assert b"line 6" in r.stderr and b"nothing was changed" in r.stderr, r.stderr
    assert open(path).read() == before


def test_what_it_does_not_take_is_named(tmp):
    path = os.path.join(tmp, "passwd")
    for args, says in [
        (["-H", "sha512", path, "u"], b"Leave -H out"),
        (["-H", "argon2id", path, "u"], b"-H argon2id is not supported"),
        (["-I", "1000", path, "u"], b"101 iterations"),
        (["-U", path, "u"], b"-U expects FILE only"),
        (["-D", path], b"-D expects FILE USER"),
        ([path], b"expects FILE USER"),
        (["-c", "-D", path, "u"], b"cannot be used with"),
        (["-x", path, "u"], b"unexpected argument '-x'"),
    ]:
        r = tern_passwd(*args, stdin=b"pw\n")
        assert r.returncode == 2, (args, r.stderr)
        assert says in r.stderr, (args, r.stderr)
    assert not os.path.exists(path)
    # mosquitto_passwd's defaults, spelled out, are what Tern writes anyway.
    r = tern_passwd("-H", "sha512-pbkdf2", "-I", "101", path, "u", stdin=b"pw\n")
    assert r.returncode == 0, r.stderr
    assert LINE7.match(open(path).read().strip())


@needs_mosquitto_passwd
def test_mosquitto_passwd_upgrade_and_tern_agree(tmp):
    """A plain-text file hashed by mosquitto_passwd -U and by tern passwd -U: both verify."""
    for tool in ["mosquitto", "tern"]:
        path = os.path.join(tmp, f"plain-{tool}")
        with open(path, "w") as f:
            f.write("alice:wonder land\nbob:b0b\n")
        if tool == "mosquitto":
            subprocess.run([MOSQUITTO_PASSWD, "-U", path], check=True)
        else:
            assert tern_passwd("-U", path).returncode == 0
        assert check(path, "alice", b"wonder land") == 0, tool
        assert check(path, "bob", b"b0b") == 0, tool
        assert check(path, "bob", b"b0") == 1, tool


def _read_until(fd, needle, timeout=10):
    out = b""
    deadline = time.time() + timeout
    while needle not in out:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"waited for {needle!r}, got {out!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _run_on_terminal(path, user, answers):
    """Run `tern passwd` with a pseudo-terminal as stdin/stdout/stderr; returns (rc, output)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(TERN_BIN, [TERN_BIN, "passwd", path, user])
    seen = b""
    try:
        for prompt, answer in answers:
            seen += _read_until(fd, prompt)
            os.write(fd, answer + b"\n")
        while True:
            r, _, _ = select.select([fd], [], [], 10)
            if not r:
                break
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        # A prompt that never came leaves the child waiting for input: it is killed after
        # 10 s rather than waited for for ever (that hung a whole `make test` once).
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen


def test_terminal_prompts_twice_without_echo(tmp):
    path = os.path.join(tmp, "passwd")
    rc, seen = _run_on_terminal(
        path,
        "alice",
        [(b"Password: ", b"tty-secret"), (b"Reenter password: ", b"tty-secret")],
    )
    assert rc == 0, seen
    assert b"tty-secret" not in seen, "password echoed"
    assert check(path, "alice", b"tty-secret") == 0

    rc, seen = _run_on_terminal(
        path, "alice", [(b"Password: ", b"one"), (b"Reenter password: ", b"two")]
    )
    assert rc != 0
    assert b"do not match" in seen
    assert check(path, "alice", b"tty-secret") == 0, "unchanged after a mismatch"


@needs_mosquitto_passwd
@pytest.mark.parametrize("algorithm", ["sha512-pbkdf2", "sha512"])
def test_mosquitto_passwd_file_verifies_with_tern(tmp, algorithm):
    path = os.path.join(tmp, "passwd")
    subprocess.run(
        [MOSQUITTO_PASSWD, "-H", algorithm, "-c", "-b", path, "alice", "w0nder land"],
        check=True,
    )
    subprocess.run(
        [MOSQUITTO_PASSWD, "-H", algorithm, "-b", path, "bob", "b0b"], check=True
    )
    assert check(path, "alice", b"w0nder land") == 0
    assert check(path, "alice", b"w0nder") == 1
    assert check(path, "bob", b"b0b") == 0
    assert check(path, "carol", b"b0b") == 1
    # Tern can update a Mosquitto file; the other user's line is kept as it was.
    bob_line = open(path).read().splitlines()[1]
    assert tern_passwd(path, "alice", stdin=b"new\n").returncode == 0
    lines = open(path).read().splitlines()
    assert lines[1] == bob_line
    assert check(path, "alice", b"new") == 0


@needs_mosquitto_passwd
def test_mosquitto_passwd_edits_tern_file(tmp):
    path = os.path.join(tmp, "passwd")
    assert tern_passwd(path, "alice", stdin=b"from tern\n").returncode == 0
    subprocess.run([MOSQUITTO_PASSWD, "-b", path, "bob", "from mosquitto"], check=True)
    assert check(path, "alice", b"from tern") == 0
    assert check(path, "bob", b"from mosquitto") == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    MOSQUITTO is None or MOSQUITTO_PUB is None,
    reason="mosquitto broker or mosquitto_pub not installed (apt-get install mosquitto mosquitto-clients)",
)
def test_mosquitto_broker_accepts_tern_file(tmp):
    path = os.path.join(tmp, "passwd")
    assert tern_passwd(path, "alice", stdin=b"tern made this\n").returncode == 0
    port = _free_port()
    assert port != 1883
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {path}\n"
            "persistence false\n"
            "log_dest stderr\n"
        )
        if os.geteuid() == 0:
            # Started as root Mosquitto would switch to the `mosquitto` user, which cannot
            # read a 0600 file owned by root.
            f.write("user root\n")
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if broker.poll() is not None or time.time() > deadline:
                    raise AssertionError(
                        "mosquitto did not start: " + broker.stdout.read().decode()
                    )
                time.sleep(0.05)

        def pub(user, password):
            return subprocess.run(
                [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-u", user,
                 "-P", password, "-t", "tern/passwd", "-m", "hi", "-q", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=15,
            )

        ok = pub("alice", "tern made this")
        assert ok.returncode == 0, ok.stdout
        bad = pub("alice", "tern made that")
        assert bad.returncode != 0
        assert b"not authori" in bad.stdout.lower(), bad.stdout
        unknown = pub("mallory", "tern made this")
        assert unknown.returncode != 0
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
