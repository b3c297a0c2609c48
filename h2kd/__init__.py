"""h2kd: converts virtual machine disks to KVM as transient systemd units, driven over D-Bus."""

__version__ = "0.1.0"

BUS_NAME = "org.hyper2kvm.h2kd1"
MANAGER_PATH = "/org/hyper2kvm/h2kd1"
MANAGER_INTERFACE = BUS_NAME + ".Manager"
JOB_PATH_PREFIX = MANAGER_PATH + "/job/"
WORKER_PATH_PREFIX = MANAGER_PATH + "/worker/"
