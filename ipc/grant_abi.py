"""The grant-table ABI (public/grant_table.h, version 1).

A grant table is an array of entries that a domain writes in its own memory to
say "domain D may access my frame F".  The hypervisor reads the entry when D asks
to map or copy; the granting domain never talks to D's kernel about memory at
all.  Here each domain's grant table is a memfd the hypervisor created and both
map: the domain writes entries, the hypervisor reads them and sets the status
flags (GTF_reading / GTF_writing) while a mapping exists.

Entry layout (8 bytes, as grant_entry_v1):

    u16 flags    GTF_* below
    u16 domid    the domain allowed to use this entry
    u32 frame    the granting domain's frame number (a gfn here)

A domain writes `frame` and `domid` first and `flags` last, so the hypervisor
never sees a permitted entry half-written.
"""

from __future__ import annotations

import struct

GRANT_ENTRY = struct.Struct("<HHI")
GRANT_ENTRY_SIZE = GRANT_ENTRY.size

GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

# Grant references the toolstack fills in before a guest boots (grant_table.h).
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
GNTTAB_NR_RESERVED_ENTRIES = 8

# GNTTABOP_copy flags.
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

# Status codes (GNTST_*), returned per operation in a batch.
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12

DEFAULT_GRANT_FRAMES = 4  # 4 pages x 512 entries = 2048 grant references


def read_entry(buf, ref: int) -> tuple[int, int, int]:
    """Return (flags, domid, frame) of entry `ref`."""
    return GRANT_ENTRY.unpack_from(buf, ref * GRANT_ENTRY_SIZE)
