#!/usr/bin/env bash
# Install promtool (tests/python/test_deploy.py checks deploy/prometheus/tern-alerts.yml with
# `promtool check rules`) from Debian's `prometheus` package if it is missing, without leaving
# a Prometheus server running: the package's service is kept from starting.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
echo "installing promtool from Debian's prometheus package" >&2
# policy-rc.d exit 101 means "action forbidden": invoke-rc.d and deb-systemd-invoke both ask it,
# so the package's postinst starts no server (on systemd machines and in containers alike).
# Only add it (and later remove it) when the machine has none.
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
before=$(pidof prometheus || true)
$SUDO apt-get update -qq
# No recommends: they would add node-exporter, another service.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# If a server was started anyway (a policy-rc.d that allowed it), stop and disable it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus.service 2>/dev/null || true
fi
for pid in $(pidof prometheus || true); do
  case " $before " in *" $pid "*) continue ;; esac
  # Only the system server (the package's /etc/prometheus config), never someone else's.
  if tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | grep -q '/etc/prometheus\|^/usr/bin/prometheus $'; then
    echo "stopping the system prometheus (pid $pid) the package started" >&2
    $SUDO kill "$pid" || true
  fi
done
command -v promtool >/dev/null
