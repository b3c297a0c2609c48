"""h2k-worker: the program that runs one job attempt inside its transient systemd unit."""
