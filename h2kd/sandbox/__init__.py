"""The private stack for tests and the demo: dbus-daemon, journald, polkitd, a systemd manager and h2kd."""
