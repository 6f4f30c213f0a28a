"""Client certificate revocation (`crl_file` on the TLS listener) and X.509 v1 client
certificates, against the real binary with paho-mqtt clients (Python's ssl / OpenSSL).

Every certificate is made with the openssl CLI in the test's tmp_path: certs/gen.sh's CA, server
and client certificates, a second client certificate, and CRLs written by `openssl ca`. Every
wait is bounded.
"""
import os
import signal
import subprocess
import time

import pytest

from conftest import TERN_BIN, gen_certs
from test_tls import Clients, start_tls, tls_refused

CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"


class Pki:
    """certs/gen.sh's CA with what `openssl ca` needs to revoke certificates and write CRLs."""

    def __init__(self, d):
        self.c = gen_certs(d)
        self.dir = self.c.dir
        with open(self.path("ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = tern\n[tern]\ndatabase = index.txt\n"
                    "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n")
        open(self.path("index.txt"), "w").close()
        with open(self.path("crlnumber"), "w") as f:
            f.write("01\n")

    def path(self, name):
        return os.path.join(self.dir, name)

    def openssl(self, *args):
        r = subprocess.run(["openssl", *args], cwd=self.dir, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        assert r.returncode == 0, (args, r.stdout.decode("utf-8", "replace"))

    def client(self, name, v3=True):
        """NAME.pem / NAME.key signed by the CA. v3=False is the command of Mosquitto's TLS
        guide (`openssl x509 -req ... -CAcreateserial -out client.crt`, no -extfile), which
        writes an X.509 v1 certificate."""
        self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        cmd = ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
               "-CAcreateserial", "-out", f"{name}.pem"]
        if v3:
            with open(self.path("client.ext"), "w") as f:
                f.write(CLIENT_EXT)
            cmd += ["-extfile", "client.ext"]
        self.openssl(*cmd)
        return self.path(f"{name}.pem"), self.path(f"{name}.key")

    def revoke(self, pem):
        self.openssl("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
                     "-revoke", pem)

    def crl(self, out, keep_mtime=False):
        """The CA's CRL (everything revoked so far) written over `out`; with keep_mtime the
        file keeps its modification time, so only a SIGHUP can make the broker re-read it."""
        st = os.stat(out) if keep_mtime else None
        tmp = out + ".new"
        self.openssl("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
                     "-gencrl", "-out", tmp)
        with open(tmp, "rb") as f:
            data = f.read()
        with open(out, "wb") as f:
            f.write(data)
        if st:
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def clients(request):
    f = Clients(request.node.name)
    yield f
    f.close()


def wait_log(b, pred, timeout=6.0):
    deadline = time.monotonic() + timeout
    while not pred(b.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred(b.log())


def start(make_broker, pki, crl):
    return start_tls(make_broker, pki.c, client_ca=True, require_client_cert=True,
                     extra={"listeners.tls": {"crl_file": crl}})


def test_revoked_client_refused_after_sighup(make_broker, tmp_path, clients):
    """Two client certificates from one CA and an empty CRL: both connect. One is revoked and
    the CRL file rewritten (its modification time kept, so the file watcher cannot be what
    reloads it); after SIGHUP the revoked client is refused while the other still connects,
    and a connection made before the revocation stays up (the check is at the handshake)."""
    pki = Pki(tmp_path / "pki")
    other = pki.client("other")
    crl = pki.path("crl.pem")
    pki.crl(crl)
    b = start(make_broker, pki, crl)

    early = clients.tls(b, "early", pki.c.ca_pem, pki.c.client_pem, pki.c.client_key)
    assert early.connect()[0] == 0
    assert early.subscribe("crl/#", qos=1) == [1]
    assert clients.tls(b, "other1", pki.c.ca_pem, *other).connect()[0] == 0

    pki.revoke(pki.c.client_pem)
    pki.crl(crl, keep_mtime=True)
    # Not re-read yet: the file's modification time did not change.
    time.sleep(2.5)
    assert clients.tls(b, "before-hup", pki.c.ca_pem, pki.c.client_pem,
                       pki.c.client_key).connect()[0] == 0

    reloaded = b.log().count("reloaded")
    b.proc.send_signal(signal.SIGHUP)
    assert wait_log(b, lambda log: log.count("reloaded") > reloaded), b.log()

    revoked = clients.tls(b, "revoked", pki.c.ca_pem, pki.c.client_pem, pki.c.client_key)
    how = tls_refused(revoked)
    assert how, how
    assert wait_log(b, lambda log: "Revoked" in log), b.log()
    assert clients.tls(b, "other2", pki.c.ca_pem, *other).connect()[0] == 0

    assert early.c.is_connected() and early.disconnects.empty()
    p = clients.tls(b, "pub", pki.c.ca_pem, *other)
    assert p.connect()[0] == 0
    p.publish("crl/x", b"still-here", qos=1)
    m = early.get()
    assert (m.topic, m.payload) == ("crl/x", b"still-here")


def test_crl_file_change_is_picked_up_and_a_bad_one_keeps_the_previous(make_broker, tmp_path,
                                                                       clients):
    """The CRL is watched like the certificates: a new CRL revoking a client takes effect
    within a few seconds without a signal. A CRL file then broken (garbage, then a certificate
    instead of a CRL) fails the reload, and the previous CRLs stay in force: the revoked client
    is still refused, the other still connects."""
    pki = Pki(tmp_path / "pki")
    other = pki.client("other")
    crl = pki.path("crl.pem")
    pki.crl(crl)
    b = start(make_broker, pki, crl)
    assert clients.tls(b, "c1", pki.c.ca_pem, pki.c.client_pem,
                       pki.c.client_key).connect()[0] == 0

    time.sleep(1.1)  # a modification time the watcher can tell from the first
    pki.revoke(pki.c.client_pem)
    pki.crl(crl)
    deadline = time.monotonic() + 8
    attempt = 0
    while True:
        attempt += 1
        c = clients.tls(b, f"c-after{attempt}", pki.c.ca_pem, pki.c.client_pem,
                        pki.c.client_key)
        try:
            tls_refused(c, timeout=3)
            break
        except AssertionError:  # still accepted: the new CRL is not in force yet
            c.close()
        assert time.monotonic() < deadline, "revocation not picked up:\n" + b.log()
        time.sleep(0.3)
    assert wait_log(b, lambda log: "Revoked" in log), b.log()

    for bad in (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
                open(pki.c.ca_pem, "rb").read()):
        failures = b.log().count("reload failed")
        time.sleep(1.1)
        with open(crl, "wb") as f:
            f.write(bad)
        assert wait_log(b, lambda log: log.count("reload failed") > failures), b.log()
        tls_refused(clients.tls(b, f"still-revoked{failures}", pki.c.ca_pem, pki.c.client_pem,
                                pki.c.client_key))
        assert clients.tls(b, f"other{failures}", pki.c.ca_pem, *other).connect()[0] == 0
    assert "crl.pem" in b.log()
    assert b.alive()


def test_x509_v1_client_certificate_is_refused_with_a_named_log_line(make_broker, tmp_path,
                                                                      clients):
    """A client certificate made as Mosquitto's TLS guide shows (no -extfile: X.509 v1) is
    refused, and the broker's log says "X.509 v1 client certificate" and how to re-issue it;
    the same key re-issued as v3 connects."""
    pki = Pki(tmp_path / "pki")
    v1 = pki.client("legacy", v3=False)
    out = subprocess.run(["openssl", "x509", "-in", v1[0], "-noout", "-text"],
                         stdout=subprocess.PIPE, timeout=30).stdout.decode()
    assert "Version: 1 (0x0)" in out, out
    b = start_tls(make_broker, pki.c, client_ca=True, require_client_cert=True)

    tls_refused(clients.tls(b, "v1", pki.c.ca_pem, *v1))
    assert wait_log(b, lambda log: "X.509 v1 client certificate" in log), b.log()
    line = next(l for l in b.log_lines if "X.509 v1 client certificate" in l)
    assert "CN=legacy" in line and "-extfile" in line and "extendedKeyUsage=clientAuth" in line, \
        line

    # Re-issued as the line says (same key and CSR, with the extensions): accepted.
    v3 = pki.client("legacy", v3=True)
    assert clients.tls(b, "v3", pki.c.ca_pem, *v3).connect()[0] == 0


def tern_check(tmp_path, pki, **tls):
    table = {"bind": "127.0.0.1:0", "cert": pki.c.server_pem, "key": pki.c.server_key,
             "client_ca": pki.c.ca_pem, **tls}
    lines = ["[listeners.tls]"] + [f'{k} = "{v}"' for k, v in table.items()]
    cfg = tmp_path / "check.toml"
    cfg.write_text("\n".join(lines) + "\n")
    r = subprocess.run([TERN_BIN, "check", "--config", str(cfg)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30, text=True)
    return r.returncode, r.stdout, r.stderr


def test_check_reads_the_crl_and_warns_about_v1_certificates(tmp_path):
    """`tern check` reads crl_file as the listener would (a file without a CRL fails with exit
    2 naming it), and warns on stderr with exit 0 when client_ca holds an X.509 v1 certificate;
    a v1 server certificate is an error that says so."""
    pki = Pki(tmp_path / "pki")
    crl = pki.path("crl.pem")
    pki.crl(crl)
    rc, out, err = tern_check(tmp_path, pki, crl_file=crl)
    assert (rc, err) == (0, ""), (rc, out, err)

    rc, out, err = tern_check(tmp_path, pki, crl_file=pki.c.ca_pem)
    assert rc == 2 and "no CRL found" in err and pki.c.ca_pem in err, (rc, out, err)

    # A v1 CA (as `openssl x509 -req -signkey` makes without -extfile) in client_ca.
    pki.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", "/CN=Old CA", "-keyout", "old-ca.key", "-out", "old-ca.csr")
    pki.openssl("x509", "-req", "-in", "old-ca.csr", "-signkey", "old-ca.key", "-out",
                "old-ca.pem")
    rc, out, err = tern_check(tmp_path, pki, client_ca=pki.path("old-ca.pem"))
    assert rc == 0 and "configuration OK" in out, (rc, out, err)
    assert "warning" in err and "X.509 v1" in err and "CN=Old CA" in err, err

    # A v1 server certificate: the broker could not start with it, so neither does the check.
    pki.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", "/CN=localhost", "-keyout", "v1server.key", "-out", "v1server.csr")
    pki.openssl("x509", "-req", "-in", "v1server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "v1server.pem")
    rc, out, err = tern_check(tmp_path, pki, cert=pki.path("v1server.pem"),
                              key=pki.path("v1server.key"))
    assert rc == 2 and "X.509 v1" in err and "-extfile" in err, (rc, out, err)
