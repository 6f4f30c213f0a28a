"""Docs drift: what the broker sends is what docs/protocol.md says it sends.

Every reason code the broker's code uses (a `ReasonCode::Name` outside the enum's definition
and outside test code) must appear, by its hex value, in a row of the reason-code table of
docs/protocol.md; and every code that table lists must be one the code uses, so a row cannot
outlive the behaviour it describes. Reads files only; no broker.
"""
import glob
import os
import re

from conftest import ROOT

SRC = os.path.join(ROOT, "src")


def reason_codes():
    """{name: value} from the ReasonCode enum."""
    with open(os.path.join(SRC, "protocol", "mod.rs")) as f:
        text = f.read()
    body = text[text.index("pub enum ReasonCode {"):]
    body = body[:body.index("}")]
    return {m.group(1): int(m.group(2), 16) for m in re.finditer(r"(\w+) = 0x([0-9A-Fa-f]+)", body)}


def used_names():
    """ReasonCode variants named in non-test source code."""
    used = set()
    for path in glob.glob(os.path.join(SRC, "**", "*.rs"), recursive=True):
        with open(path) as f:
            text = f.read()
        if path.endswith(("_tests.rs", "tests.rs")) or os.sep + "sim.rs" in path:
            continue
        # Test modules (not the `#[cfg(test)] mod sim;` declarations above real code).
        text = re.split(r"#\[cfg\(test\)\]\s*\n\s*mod tests", text)[0]
        # A match arm (`ReasonCode::X =>` or `ReasonCode::X | ...`) maps a code, it sends none.
        # Variants are CamelCase; `ReasonCode::granted(..)` and friends are functions.
        used |= set(re.findall(r"ReasonCode::([A-Z]\w*)\b(?!\s*(?:=>|\|))", text))
    return used


# Named in the code but never sent as themselves, each covered by another row of the table.
NOT_SENT_AS_SUCH = {
    # Refused with a 3.1.1-form CONNACK 0x01, whatever the client's version (row 0x01).
    "UnsupportedProtocolVersion",
    # Only ever refused to 3.x clients, as return code 0x02 (row 0x02).
    "ClientIdentifierNotValid",
    # Received, not sent: a bridge's link (src/bridge/) reads a remote's 3.1.1 CONNACK refusal
    # and its own publish failures as it; the broker never sends it to a client.
    "UnspecifiedError",
}


def documented_codes():
    """Hex codes in the rows of protocol.md's reason-code table (| Packet | Code | ...)."""
    with open(os.path.join(ROOT, "docs", "protocol.md")) as f:
        doc = f.read()
    start = doc.index("| Packet     | Code |")
    table = doc[start:doc.index("\n\n", start)]
    codes = set()
    for line in table.splitlines()[2:]:
        cell = line.split("|")[2].strip()
        for a, b in re.findall(r"0x([0-9A-Fa-f]{2})(?:–0x([0-9A-Fa-f]{2}))?", cell):
            lo = int(a, 16)
            for v in range(lo, int(b, 16) + 1 if b else lo + 1):
                codes.add(v)
    return codes


def test_every_reason_code_sent_is_in_the_protocol_table():
    codes = reason_codes()
    used = used_names()
    assert len(codes) >= 30 and len(used) >= 20, (len(codes), len(used))
    unknown = used - set(codes)
    assert not unknown, f"used but not in the enum: {unknown}"
    documented = documented_codes()
    # Success (0x00) and the granted QoS values are the SUBACK/CONNACK rows' first entries.
    missing = sorted(f"{n} (0x{codes[n]:02X})" for n in used - NOT_SENT_AS_SUCH
                     if codes[n] not in documented)
    assert not missing, f"sent but not in docs/protocol.md's reason-code table: {missing}"


def test_the_protocol_table_lists_only_codes_the_code_uses():
    codes = reason_codes()
    used_values = {codes[n] for n in used_names()} | {0x00, 0x01, 0x02}
    # 3.x CONNACK return codes (0x01-0x05) are written as plain numbers, not through the enum.
    used_values |= {0x03, 0x04, 0x05}
    stale = sorted(f"0x{v:02X}" for v in documented_codes() - used_values)
    assert not stale, f"docs/protocol.md lists codes the broker never sends: {stale}"
