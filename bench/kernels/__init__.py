"""Benchmark kernels: measuring loops that run *inside* domains.

What this is
------------
A hypervisor benchmark driven from outside (a test process asking dom0, over a
socket, to make one hypercall at a time) measures mostly the driver: two extra
process hops per operation. Xen's own micro-benchmarks run their loops in a
guest kernel. These kernels do the same: they are domain kernels like
``domains.domu.kernel``, started by the real domain builder, booted through the
real boot hypercall, talking to the real hypervisor through the guest kernel
library (``domains.kernel``). The driving process only starts the hypervisor
and collects results.

Pieces
------
* ``bench.kernels.dom0``  the control domain's bench kernel: the orchestrator.
  It creates guests with ``domctl createdomain``, wires their event channels,
  tells each guest which loop to run, times domain creation itself, and
  reports every raw sample to the driver.
* ``bench.kernels.guest`` the guest bench kernel: an agent that runs one
  measuring loop per command (event-channel ping or pong, null hypercalls,
  grant map/unmap, grant copy) and answers with raw nanosecond samples.
* ``bench.kernels.link``  the out-of-band control link (msgpack over a Unix
  stream socket) between driver, dom0 and guests.

Where this differs from Xen
---------------------------
The control link is not part of microxen: it stands for the serial console or
the shared result page a real benchmark harness would use, and it is never on
the measured path. Every loop's timed section touches only the hypervisor
(hypercalls, upcalls, grant pages). Clocks are ``time.perf_counter_ns``, which
is CLOCK_MONOTONIC on Linux, so a timestamp taken in dom0 and one taken in a
guest can be subtracted.
"""
