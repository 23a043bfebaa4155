"""Shutdown reasons of SCHEDOP_shutdown (public/sched.h).

A guest that wants to stop tells the hypervisor why; the toolstack in dom0 then
applies the matching on_poweroff / on_reboot / on_crash action from the guest's
config.  The hypervisor records the reason and nothing more.
"""

SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5

REASON_NAMES = {
    SHUTDOWN_poweroff: "poweroff",
    SHUTDOWN_reboot: "reboot",
    SHUTDOWN_suspend: "suspend",
    SHUTDOWN_crash: "crash",
    SHUTDOWN_watchdog: "watchdog",
    SHUTDOWN_soft_reset: "soft_reset",
}
REASONS = {name: code for code, name in REASON_NAMES.items()}
