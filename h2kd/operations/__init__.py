"""What a worker does with a disk image: inspect, convert, validate, offline_fix (qemu-img and guest tools)."""
