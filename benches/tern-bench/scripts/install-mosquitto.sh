#!/usr/bin/env bash
# Install the Mosquitto broker from Debian's packages if it is missing, without leaving a
# system broker running on 1883 (the benchmark never uses 1883; Tern's tests do).
set -euo pipefail
MOSQ=${MOSQUITTO:-/usr/sbin/mosquitto}
if [ -x "$MOSQ" ] || command -v mosquitto >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
echo "tern-bench: installing mosquitto from Debian's packages" >&2
# Keep the package's init script from starting a system broker: policy-rc.d exit 101 means
# "action forbidden". Only add it (and later remove it) when the machine has none.
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
before=$(pidof mosquitto || true)
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
if [ -n "$created_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
# If the package started a system broker anyway (systemd machines), stop it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl stop mosquitto.service 2>/dev/null || true
  $SUDO systemctl disable mosquitto.service 2>/dev/null || true
fi
for pid in $(pidof mosquitto || true); do
  case " $before " in *" $pid "*) continue ;; esac
  # Only the system broker (started from /etc/mosquitto), never another user's instance.
  if tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | grep -q '/etc/mosquitto'; then
    echo "tern-bench: stopping the system mosquitto (pid $pid) the package started" >&2
    $SUDO kill "$pid" || true
  fi
done
