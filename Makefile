# h2kd: `make demo` shows it working, `make test` is the test suite (what CI runs).
# Both set up what they need: Debian packages (deps) and a virtualenv in .venv (venv).

PYTHON   ?= python3
# The interpreter of the installed h2kd: the system's, never one from a user's PATH (a pyenv shim in root's
# home). Its virtualenv is tied to its minor version: after a Python upgrade, run `make install-app` again.
INSTALL_PYTHON ?= /usr/bin/python3
VENV     ?= .venv
DESTDIR  ?=
PREFIX   ?= /usr
BINDIR   ?= $(PREFIX)/bin
LIBDIR   ?= $(PREFIX)/lib
DATADIR  ?= $(PREFIX)/share
SYSTEM_DATADIR ?= /usr/share
# systemd reads units from /usr/lib/systemd/system and /usr/local/lib/systemd/system (and /etc); with
# another PREFIX, give UNITDIR (pkg-config --variable=systemdsystemunitdir systemd).
UNITDIR  ?= $(LIBDIR)/systemd/system
CATALOGDIR ?= $(LIBDIR)/systemd/catalog
SYSUSERSDIR ?= $(LIBDIR)/sysusers.d
APPDIR   ?= $(LIBDIR)/h2kd
# zsh's own directory for packages on Debian (/usr only); site-functions elsewhere.
ZSHCOMPDIR ?= $(if $(filter /usr,$(PREFIX)),$(DATADIR)/zsh/vendor-completions,$(DATADIR)/zsh/site-functions)
PYTEST_ARGS ?=

# python3-venv (ensurepip) for the virtualenvs of `make venv` and `make install`; what pip needs to
# build systemd-python and dbus-python, which come as source only (a compiler, the Python headers,
# pkg-config and the libraries' headers); the real programs the tests run (qemu-img, cockpit,
# chromium, prometheus, tmux, libvirt's virt-xml-validate for the domain XML), and systemd-importd's
# unit, which the tests compare our unit's hardening with; libseccomp2 for the filter guest repairs run their
# guest's programs under, and perl, which its tests run as such a program. systemd itself comes with the machine.
DEB_PACKAGES = python3-venv python3-dev gcc pkg-config libsystemd-dev libdbus-1-dev libglib2.0-dev qemu-utils \
	cockpit-ws cockpit-bridge chromium chromium-driver prometheus tmux systemd-container \
	dbus-daemon polkitd libglib2.0-bin zsh man-db debootstrap qemu-system-x86 fdisk lvm2 \
	libvirt-clients libxml2-utils libseccomp2 perl

.PHONY: all deps venv test demo install install-app install-data uninstall bench clean distclean

all: venv

deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

test: deps venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: deps venv
	$(VENV)/bin/h2k-sandbox run -- $(VENV)/bin/python -m h2kd.demo

bench: deps venv
	@if [ -x bench/run ]; then bench/run; else echo "bench/run does not exist yet"; fi

# h2kd goes into a virtualenv of its own in $(APPDIR), with h2kctl linked into $(BINDIR); the daemon
# and its worker stay in $(APPDIR)/bin, out of users' PATH (as udisksd or systemd-importd are), and so
# does h2k-sandbox, the private stack of the tests and the demo. The D-Bus, systemd and polkit files go
# where those programs look for them.
install: install-app install-data

# Earlier installs linked the daemon and its worker into BINDIR too: those links (and only ours) go.
REMOVE_OLD_LINKS = for cmd in h2kd h2k-worker; do \
		[ "$$(readlink $(DESTDIR)$(BINDIR)/$$cmd)" != "$(APPDIR)/bin/$$cmd" ] || rm -f $(DESTDIR)$(BINDIR)/$$cmd; \
	done

install-app:
	install -d $(DESTDIR)$(APPDIR)
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(APPDIR)
	$(DESTDIR)$(APPDIR)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(APPDIR)/bin/pip install -q .
	@# Scripts, pyvenv.cfg and the activate scripts name the staging path when DESTDIR is set; make them
	@# name the final one.
	if [ -n "$(DESTDIR)" ]; then \
		grep -lr --null -F '$(DESTDIR)$(APPDIR)' $(DESTDIR)$(APPDIR)/bin $(DESTDIR)$(APPDIR)/pyvenv.cfg \
			| xargs -0r sed -i 's|$(DESTDIR)$(APPDIR)|$(APPDIR)|g'; \
	fi
	@# pip and venv follow the caller's umask: under a hardened one (027), users could not run h2kctl.
	chmod -R u=rwX,go=rX $(DESTDIR)$(APPDIR)
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(APPDIR)/bin/h2kctl $(DESTDIR)$(BINDIR)/h2kctl
	$(REMOVE_OLD_LINKS)

# dbus-daemon reads bus policies only from /usr/share/dbus-1/system.d (and /etc), polkitd actions only
# from /usr/share/polkit-1/actions: those, and the activation file with the policy, go there whatever
# PREFIX is.
install-data:
	install -Dm0644 dbus/org.hyper2kvm.h2kd1.conf $(DESTDIR)$(SYSTEM_DATADIR)/dbus-1/system.d/org.hyper2kvm.h2kd1.conf
	install -Dm0644 dbus/org.hyper2kvm.h2kd1.service $(DESTDIR)$(SYSTEM_DATADIR)/dbus-1/system-services/org.hyper2kvm.h2kd1.service
	for f in dbus/org.hyper2kvm.h2kd1.*.xml; do \
		install -Dm0644 $$f $(DESTDIR)$(DATADIR)/dbus-1/interfaces/$$(basename $$f); \
	done
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|^ExecStart=/usr/lib/h2kd/bin/h2kd|ExecStart=$(APPDIR)/bin/h2kd|' systemd/h2kd.service > $(DESTDIR)$(UNITDIR)/h2kd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/h2kd.service
	install -m0644 systemd/h2k.slice $(DESTDIR)$(UNITDIR)/h2k.slice
	install -Dm0644 systemd/h2kd.sysusers $(DESTDIR)$(SYSUSERSDIR)/h2kd.conf
	[ -n "$(DESTDIR)" ] || systemd-sysusers $(SYSUSERSDIR)/h2kd.conf || true
	if [ -f systemd/h2kd.catalog ]; then \
		install -Dm0644 systemd/h2kd.catalog $(DESTDIR)$(CATALOGDIR)/h2kd.catalog; \
		[ -n "$(DESTDIR)" ] || journalctl --update-catalog || true; \
	fi
	for f in polkit/*.policy; do \
		install -Dm0644 $$f $(DESTDIR)$(SYSTEM_DATADIR)/polkit-1/actions/$$(basename $$f); \
	done
	install -d $(DESTDIR)$(DATADIR)/doc/h2kd/examples
	for f in polkit/*.rules.example; do \
		[ -e "$$f" ] && install -m0644 $$f $(DESTDIR)$(DATADIR)/doc/h2kd/examples/; \
	done; true
	if [ -n "$$(ls -A cockpit 2>/dev/null)" ]; then \
		install -d $(DESTDIR)$(DATADIR)/cockpit/h2kd && cp -R cockpit/. $(DESTDIR)$(DATADIR)/cockpit/h2kd/ \
			&& chmod -R u=rwX,go=rX $(DESTDIR)$(DATADIR)/cockpit/h2kd; \
	fi
	install -Dm0644 h2kctl/h2kctl.1 $(DESTDIR)$(DATADIR)/man/man1/h2kctl.1
	install -Dm0644 h2kd/h2kd.8 $(DESTDIR)$(DATADIR)/man/man8/h2kd.8
	install -Dm0644 h2kctl/completion/h2kctl.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/h2kctl
	install -Dm0644 h2kctl/completion/_h2kctl $(DESTDIR)$(ZSHCOMPDIR)/_h2kctl
	@# dbus-broker reads a new bus policy only when told to: until then, h2kd may not own its name.
	@echo "installed; then: systemctl daemon-reload && systemctl reload dbus && systemctl enable --now h2kd.service"

# Removes what install put there; h2kd's state (/var/lib/h2kd: jobs and outputs) and /etc/h2kd stay.
uninstall:
	-[ -n "$(DESTDIR)" ] || systemctl disable --now h2kd.service 2>/dev/null
	rm -f $(DESTDIR)$(SYSTEM_DATADIR)/dbus-1/system.d/org.hyper2kvm.h2kd1.conf \
		$(DESTDIR)$(SYSTEM_DATADIR)/dbus-1/system-services/org.hyper2kvm.h2kd1.service \
		$(DESTDIR)$(DATADIR)/dbus-1/interfaces/org.hyper2kvm.h2kd1.*.xml \
		$(DESTDIR)$(UNITDIR)/h2kd.service $(DESTDIR)$(UNITDIR)/h2k.slice $(DESTDIR)$(CATALOGDIR)/h2kd.catalog \
		$(DESTDIR)$(SYSUSERSDIR)/h2kd.conf \
		$(DESTDIR)$(SYSTEM_DATADIR)/polkit-1/actions/org.hyper2kvm.h2kd1.policy \
		$(DESTDIR)$(DATADIR)/man/man1/h2kctl.1 $(DESTDIR)$(DATADIR)/man/man8/h2kd.8 \
		$(DESTDIR)$(DATADIR)/bash-completion/completions/h2kctl $(DESTDIR)$(ZSHCOMPDIR)/_h2kctl \
		$(DESTDIR)$(BINDIR)/h2kctl
	$(REMOVE_OLD_LINKS)
	rm -rf $(DESTDIR)$(DATADIR)/doc/h2kd $(DESTDIR)$(DATADIR)/cockpit/h2kd $(DESTDIR)$(APPDIR)
	-[ -n "$(DESTDIR)" ] || { systemctl daemon-reload; journalctl --update-catalog; } 2>/dev/null

clean:
	rm -rf build dist .pytest_cache .hypothesis *.egg-info artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
