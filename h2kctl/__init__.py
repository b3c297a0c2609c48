"""h2kctl: the command line client of h2kd; it talks only to the D-Bus API org.hyper2kvm.h2kd1."""
