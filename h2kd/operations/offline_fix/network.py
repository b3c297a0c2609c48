"""Network configuration that would keep a converted VM offline: MAC pinning and VMware NIC names.

On KVM the first NIC is a virtio NIC with another MAC address and another name (ens3, enp1s0, ...). So:
  - udev persistent-net rules and systemd .link files that name NICs by MAC address are moved aside;
  - ifupdown: `hwaddress` lines go, and each physical NIC stanza (eth*, en*) is brought up by pattern:
    "auto ens192" becomes "auto /e*/1=ens192" (the first NIC whose name starts with "e", configured by
    the ens192 stanza), the second one /e*/2, and so on;
  - netplan: MAC matches and set-name go; an ethernet without a match gets `match: name: "e*"`;
  - NetworkManager: mac-address= and interface-name= go from ethernet profiles;
  - systemd-networkd: MACAddress= goes from [Match], and a VMware NIC name becomes "en* eth*";
  - network-scripts (ifcfg): HWADDR= and MACADDR= go.
Every changed file keeps its original as <file>.h2k-backup.

The files are the guest's, of any content: every scan here takes time in proportion to a file's size (no
pattern that backtracks over a long line, no lookup in a list that grows with the file), so that no file
keeps the repair busy until its time limit.
"""

from __future__ import annotations

import re

from h2kd.operations.offline_fix.guestfs import GuestFS
from h2kd.operations.offline_fix.outcome import Fix

PHYSICAL_NIC = re.compile(r"^(?:eth\d+|en[a-z0-9]+)$")
# A rule that matches a MAC address and sets NAME after it: the two are looked for one after the other on
# each line, as one pattern (address, ".*", NAME) took time in the square of a line's length.
_UDEV_ADDRESS_MATCH = re.compile(r"ATTRS?\{address\}\s*==", re.I)
_UDEV_NAME_ASSIGN = re.compile(r"\bNAME\s*:?=", re.I)
# [^\S\n]: blanks within the line only; \s* would run on over every empty line that follows, at each of them.
_LINK_MAC = re.compile(r"^[^\S\n]*MACAddress[^\S\n]*=", re.M)
_LINK_NAME = re.compile(r"^[^\S\n]*Name[^\S\n]*=", re.M)


def _names_nic_by_mac(rules: str) -> bool:
    for line in rules.split("\n"):
        address = _UDEV_ADDRESS_MATCH.search(line)
        if address and _UDEV_NAME_ASSIGN.search(line, address.end()):
            return True
    return False


def _udev_rules(guest: GuestFS, fix: Fix) -> None:
    for directory in ("/etc/udev/rules.d",):
        for name in guest.listdir(directory):
            path = f"{directory}/{name}"
            if not name.endswith(".rules"):
                continue
            text = guest.read_text(path) or ""
            if name.endswith("persistent-net.rules") or _names_nic_by_mac(text):
                if guest.remove(path):
                    fix.changes.append(f"{path}: moved aside (names NICs by MAC address)")


def _ifupdown_files(guest: GuestFS) -> list[str]:
    files = ["/etc/network/interfaces"] if guest.is_file("/etc/network/interfaces") else []
    files += [f"/etc/network/interfaces.d/{n}" for n in guest.listdir("/etc/network/interfaces.d")
              if guest.is_file(f"/etc/network/interfaces.d/{n}") and not n.endswith((".h2k-backup", "~"))]
    return files


def _ifupdown(guest: GuestFS, fix: Fix) -> None:
    order: dict[str, int] = {}      # NIC name: its place among the physical NICs, from 1
    for path in _ifupdown_files(guest):
        for line in (guest.read_text(path) or "").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "iface" and PHYSICAL_NIC.match(fields[1]) and fields[1] not in order:
                order[fields[1]] = len(order) + 1
    for path in _ifupdown_files(guest):
        text = guest.read_text(path) or ""
        out = []
        for line in text.splitlines(keepends=True):
            fields = line.split()
            if fields and fields[0] == "hwaddress":
                fix.changes.append(f"{path}: removed `{line.strip()}`")
                continue
            if fields and (fields[0] == "auto" or fields[0].startswith("allow-")) and len(fields) > 1:
                names = []
                for name in fields[1:]:
                    if name in order:
                        pattern = f"/e*/{order[name]}={name}"
                        fix.changes.append(f"{path}: {fields[0]} {name} -> {fields[0]} {pattern}")
                        names.append(pattern)
                    else:
                        names.append(name)
                indent = line[:len(line) - len(line.lstrip())]
                line = indent + " ".join([fields[0], *names]) + "\n"
            out.append(line)
        new = "".join(out)
        if new != text:
            guest.write_text(path, new)


def _netplan(guest: GuestFS, fix: Fix) -> None:
    for name in guest.listdir("/etc/netplan"):
        path = f"/etc/netplan/{name}"
        if not name.endswith((".yaml", ".yml")):
            continue
        text = guest.read_text(path) or ""
        new = _netplan_text(text, path, fix)
        if new != text:
            guest.write_text(path, new)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _netplan_text(text: str, path: str, fix: Fix) -> str:
    """Line-based edit of the ethernets section (netplan files are simple; no YAML library is needed)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    in_ethernets, eth_indent, entry_indent = False, -1, -1
    entry_name, entry_has_match, entry_lines_start = "", False, 0

    def close_entry() -> None:
        nonlocal entry_name
        if entry_name and not entry_has_match and PHYSICAL_NIC.match(entry_name):
            child = " " * (entry_indent + 2)
            out.insert(entry_lines_start, f"{child}match:\n{child}  name: \"e*\"\n")
            fix.changes.append(f"{path}: {entry_name} matches any NIC named e* (was its VMware name only)")
        entry_name = ""

    skip_match_indent = -1
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
            continue
        indent = _indent(line)
        if skip_match_indent >= 0 and indent > skip_match_indent:
            if stripped.startswith(("macaddress:", "name:")):
                continue
            out.append(line)
            continue
        skip_match_indent = -1
        if stripped.startswith("ethernets:"):
            in_ethernets, eth_indent, entry_indent = True, indent, -1
            out.append(line)
            continue
        if in_ethernets and indent <= eth_indent:
            close_entry()
            in_ethernets = False
        if in_ethernets:
            if entry_indent < 0:
                entry_indent = indent
            if indent == entry_indent and stripped.endswith(":"):
                close_entry()
                entry_name, entry_has_match = stripped[:-1].strip("\"'"), False
                out.append(line)
                entry_lines_start = len(out)
                continue
            if indent > entry_indent and stripped.startswith("match:"):
                entry_has_match = True
                child = " " * (indent + 2)
                out.append(line)
                out.append(f"{child}name: \"e*\"\n")
                fix.changes.append(f"{path}: {entry_name}: match by MAC/name replaced by name \"e*\"")
                skip_match_indent = indent
                continue
            if indent > entry_indent and stripped.startswith(("set-name:", "macaddress:")):
                fix.changes.append(f"{path}: {entry_name}: removed `{stripped}`")
                continue
        out.append(line)
    if in_ethernets:
        close_entry()
    return "".join(out)


def _network_manager(guest: GuestFS, fix: Fix) -> None:
    directory = "/etc/NetworkManager/system-connections"
    for name in guest.listdir(directory):
        path = f"{directory}/{name}"
        text = guest.read_text(path)
        if text is None or name.endswith(".h2k-backup"):
            continue
        section, out = "", []
        for line in text.splitlines(keepends=True):
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
            key = stripped.split("=", 1)[0].strip()
            if (section == "ethernet" and key == "mac-address") or \
                    (section == "connection" and key == "interface-name" and PHYSICAL_NIC.match(
                        stripped.split("=", 1)[1].strip() if "=" in stripped else "")):
                fix.changes.append(f"{path}: removed `{stripped}`")
                continue
            out.append(line)
        new = "".join(out)
        if new != text:
            guest.write_text(path, new)


def _networkd(guest: GuestFS, fix: Fix) -> None:
    directory = "/etc/systemd/network"
    for name in guest.listdir(directory):
        path = f"{directory}/{name}"
        text = guest.read_text(path)
        if text is None:
            continue
        if name.endswith(".link") and _LINK_MAC.search(text) and _LINK_NAME.search(text):
            if guest.remove(path):
                fix.changes.append(f"{path}: moved aside (names a NIC by MAC address)")
            continue
        if not name.endswith(".network"):
            continue
        section, out = "", []
        for line in text.splitlines(keepends=True):
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
            if section == "Match" and re.match(r"(PermanentMACAddress|MACAddress)\s*=", stripped):
                fix.changes.append(f"{path}: removed `{stripped}`")
                continue
            m = re.match(r"Name\s*=\s*(\S+)\s*$", stripped)
            if section == "Match" and m and PHYSICAL_NIC.match(m.group(1)):
                fix.changes.append(f"{path}: Name={m.group(1)} -> Name=en* eth*")
                line = "Name=en* eth*\n"
            out.append(line)
        new = "".join(out)
        if new != text:
            guest.write_text(path, new)


def _network_scripts(guest: GuestFS, fix: Fix) -> None:
    directory = "/etc/sysconfig/network-scripts"
    for name in guest.listdir(directory):
        if not name.startswith("ifcfg-") or name == "ifcfg-lo" or name.endswith(".h2k-backup"):
            continue
        path = f"{directory}/{name}"
        text = guest.read_text(path) or ""
        out = []
        for line in text.splitlines(keepends=True):
            if re.match(r"\s*(HWADDR|MACADDR)\s*=", line):
                fix.changes.append(f"{path}: removed `{line.strip()}`")
                continue
            out.append(line)
        new = "".join(out)
        if new != text:
            guest.write_text(path, new)


def fix_network(guest: GuestFS) -> Fix:
    fix = Fix("network")
    for step in (_udev_rules, _ifupdown, _netplan, _network_manager, _networkd, _network_scripts):
        try:
            step(guest, fix)
        except OSError as e:
            fix.status, fix.reason = "failed", f"{step.__name__.strip('_')}: {e}"
            return fix
    return fix.done(guest.dry_run, "MAC pinning and VMware NIC names removed" if fix.changes else
                    "no MAC pinning or VMware NIC names found")
