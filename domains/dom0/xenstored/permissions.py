"""XenStore permissions: an owner, a default, and per-domain exceptions.

In Xen
    Each node carries a list of ``<letter><domid>`` entries (xenstore.txt,
    GET_PERMS/SET_PERMS): ``r`` read, ``w`` write, ``b`` both, ``n`` none.
    The *first* entry is special: its domid is the node's **owner** and its
    letter is the access every domain not listed later gets.  The owner may
    do anything to the node, including SET_PERMS; the privileged domain
    (dom0, or a domain "targeting" the owner via SET_TARGET) may do anything
    anywhere.  A new node inherits its parent's list, except that an
    unprivileged creator becomes the new node's owner.  Unprivileged domains
    may not give a node away: a SET_PERMS that changes the owner is EPERM.

Here
    Permissions are an immutable tuple of ``(domid, letter)`` pairs, so nodes
    can share them.  :func:`access` answers "what may domain D do here".

Invariant
    Nothing but the connection's bound identity (the domid the ring was
    introduced for, or 0 for the privileged socket) is ever passed as
    ``domid``; no message field can choose it.
"""

from __future__ import annotations

from ipc.xs_wire import XenStoreError

__all__ = ["Perms", "READ", "WRITE", "OWNER", "ALL", "DOM0_ONLY",
           "parse_perms", "format_perms", "access", "inherit_perms"]

Perms = tuple[tuple[int, str], ...]

READ, WRITE, OWNER = 1, 2, 4
ALL = READ | WRITE | OWNER
_LETTER_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}

#: Owned by dom0, nobody else may look: Xen's default for system nodes.
DOM0_ONLY: Perms = ((0, "n"),)

#: Domain ids above this are Xen's special DOMID_* values, not domains.
DOMID_FIRST_RESERVED = 0x7FF0


def parse_perms(items: list[bytes]) -> Perms:
    """Wire perm strings (``b"r5"``, ...) -> Perms; EINVAL names the bad one."""
    if not items:
        raise XenStoreError("EINVAL", "SET_PERMS needs at least one permission")
    out: list[tuple[int, str]] = []
    for raw in items:
        text = raw.decode("ascii", "replace")
        letter, digits = text[:1], text[1:]
        if letter not in _LETTER_BITS or not digits.isdigit() or len(digits) > 5:
            raise XenStoreError(
                "EINVAL", f"bad permission {text[:16]!r}: want [rwbn]<domid>")
        domid = int(digits)
        if domid > 0xFFFF:
            raise XenStoreError("EINVAL", f"domid {domid} out of range in {text!r}")
        out.append((domid, letter))
    return tuple(out)


def format_perms(perms: Perms) -> list[str]:
    return [f"{letter}{domid}" for domid, letter in perms]


def access(perms: Perms, domid: int, privileged: bool,
           target: int | None = None) -> int:
    """The READ/WRITE/OWNER bits ``domid`` has on a node with ``perms``."""
    owner = perms[0][0]
    if privileged or domid == owner or (target is not None and target == owner):
        return ALL
    for who, letter in perms[1:]:
        if who == domid:
            return _LETTER_BITS[letter]
    if target is not None:
        for who, letter in perms[1:]:
            if who == target:
                return _LETTER_BITS[letter]
    return _LETTER_BITS[perms[0][1]]


def inherit_perms(parent: Perms, creator: int, privileged: bool) -> Perms:
    """A new node's perms: the parent's, owned by an unprivileged creator."""
    if privileged:
        return parent
    rest = tuple(p for p in parent[1:] if p[0] != creator)
    return ((creator, parent[0][1]),) + rest
