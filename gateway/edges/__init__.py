"""The two gateways and what sits at their edges: accepting connections, access
control and audit, the device facts from sysfs, reloading, resource limits."""
