"""The job manager: the core that takes submissions and drives jobs through their states (no D-Bus here)."""
