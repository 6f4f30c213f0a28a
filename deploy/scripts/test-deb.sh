#!/usr/bin/env bash
# The Debian package from `make deb`, installed for real (make test-deb): dpkg installs it with
# its service kept from starting, the tern user and the conffile are there, `tern check` accepts
# the shipped configuration (as root and as the service's user), and `dpkg -r` then `dpkg -P`
# remove it cleanly: remove keeps the configuration, the state and the user; purge leaves
# nothing. Needs root or passwordless sudo (the Makefile skips it otherwise).
# usage: deploy/scripts/test-deb.sh PATH/TO/tern_VERSION_ARCH.deb
set -euo pipefail
deb=${1:?usage: test-deb.sh PACKAGE.deb}
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
step() { echo "test-deb: $*"; }

if dpkg-query -W -f='${Status}' tern 2>/dev/null | grep -q 'install ok'; then
  fail "a tern package is already installed on this machine; not touching it"
fi
if getent passwd tern >/dev/null; then
  fail "a user called tern exists already; the test would remove it"
fi

# Keep the service from starting: policy-rc.d exit 101 ("action forbidden") is what
# deb-systemd-invoke and invoke-rc.d ask. Containers without systemd would not start it anyway.
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
installed=
cleanup() {
  if [ -n "$installed" ]; then $SUDO dpkg -P tern >/dev/null 2>&1 || true; fi
  if [ -n "$created_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

# Processes running /usr/bin/tern (the packaged binary), never other Tern processes.
packaged_pids() {
  for p in $(pgrep -x tern || true); do
    if [ "$(readlink -f "/proc/$p/exe" 2>/dev/null)" = /usr/bin/tern ]; then echo "$p"; fi
  done
}

step "dpkg -i $(basename "$deb")"
installed=1
DEBIAN_FRONTEND=noninteractive $SUDO dpkg -i "$deb"

step "installed files, user and conffile"
[ -x /usr/bin/tern ] || fail "/usr/bin/tern missing"
unit=
for d in /lib/systemd/system /usr/lib/systemd/system; do
  if [ -f "$d/tern.service" ]; then unit="$d/tern.service"; fi
done
[ -n "$unit" ] || fail "tern.service not installed"
grep -q '^User=tern$' "$unit" || fail "the unit does not run as tern"
grep -q '^ExecReload=/bin/kill -HUP \$MAINPID$' "$unit" || fail "the unit's reload is not SIGHUP"
grep -q '^ExecStart=/usr/bin/tern --config /etc/tern/tern.toml$' "$unit" || fail "ExecStart"
getent passwd tern >/dev/null || fail "no tern user"
uid=$(id -u tern)
[ "$uid" -lt 1000 ] || fail "tern is not a system user (uid $uid)"
[ "$(getent passwd tern | cut -d: -f7)" = /usr/sbin/nologin ] || fail "tern has a login shell"
[ -f /etc/tern/tern.toml ] || fail "/etc/tern/tern.toml missing"
[ "$(stat -c '%U:%G %a' /etc/tern/tern.toml)" = "root:tern 640" ] \
  || fail "/etc/tern/tern.toml is $(stat -c '%U:%G %a' /etc/tern/tern.toml)"
[ "$(stat -c '%U:%G %a' /var/lib/tern)" = "tern:tern 750" ] \
  || fail "/var/lib/tern is $(stat -c '%U:%G %a' /var/lib/tern)"
dpkg-query -W -f='${Conffiles}\n' tern | grep -q '/etc/tern/tern.toml' \
  || fail "/etc/tern/tern.toml is not a conffile"
[ -z "$(packaged_pids)" ] || fail "the package started the service during the test install"

step "tern check --config /etc/tern/tern.toml"
/usr/bin/tern check --config /etc/tern/tern.toml
# As the unit's ExecReload runs it: the service user must be able to read its configuration.
$SUDO runuser -u tern -- /usr/bin/tern check --config /etc/tern/tern.toml
# And it refuses a broken one, so the check above means something.
broken=$(mktemp)
printf '[limits]\nmax_packet_size = "lots"\n' >"$broken"
if /usr/bin/tern check --config "$broken" >/dev/null 2>&1; then
  rm -f "$broken"; fail "tern check accepted a broken configuration"
fi
rm -f "$broken"

step "dpkg -r: the binary goes, configuration, state and user stay"
$SUDO dpkg -r tern
[ ! -e /usr/bin/tern ] || fail "/usr/bin/tern left after remove"
[ -f /etc/tern/tern.toml ] || fail "remove took the conffile"
[ -d /var/lib/tern ] || fail "remove took /var/lib/tern"
getent passwd tern >/dev/null || fail "remove took the tern user"

step "dpkg -P: nothing left"
$SUDO dpkg -P tern
installed=
[ ! -e /etc/tern ] || fail "/etc/tern left after purge"
[ ! -e /var/lib/tern ] || fail "/var/lib/tern left after purge"
! getent passwd tern >/dev/null || fail "tern user left after purge"
! getent group tern >/dev/null || fail "tern group left after purge"
for d in /lib/systemd/system /usr/lib/systemd/system; do
  [ ! -e "$d/tern.service" ] || fail "$d/tern.service left after purge"
done
[ ! -e /etc/systemd/system/multi-user.target.wants/tern.service ] \
  || fail "the service's enablement link left after purge"
if dpkg-query -W -f='${Status}' tern 2>/dev/null | grep -q 'installed\|config-files'; then
  fail "dpkg still lists tern: $(dpkg-query -W -f='${Status}' tern)"
fi
step "OK"
