#!/bin/sh
# Make a Debian bookworm + Python 3.11 base image locally, for machines that can reach the Debian
# and PyPI mirrors but no container registry (so `python:3.11-slim` cannot be pulled).
#
#   sudo build/container/make_base_image.sh            # -> localhost/onebox-base:bookworm
#
# Env: BASE_TAG (image name), WORK_DIR (scratch space, default /var/tmp/onebox-base),
#      DEBIAN_MIRROR (default: the mirror apt is configured with here, else deb.debian.org).
# The image is then used as `--build-arg BASE_IMAGE=localhost/onebox-base:bookworm`.
set -eu

BASE_TAG=${BASE_TAG:-localhost/onebox-base:bookworm}
WORK_DIR=${WORK_DIR:-/var/tmp/onebox-base}
SUITE=bookworm

if [ "$(id -u)" -ne 0 ]; then
    echo "make_base_image.sh: must run as root (debootstrap and chroot)" >&2
    exit 1
fi

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap
fi

# The first Debian mirror apt uses here (deb822 `URIs:` or one-line `deb` form), so the rootfs
# comes from wherever this machine is allowed to fetch packages.
apt_mirror() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }
             /^deb / && $2 ~ /\/debian\/?$/ && $3 == "'"$SUITE"'" { print $2; exit }'
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_MIRROR%/debian}/debian-security
ROOTFS=$WORK_DIR/rootfs

echo "make_base_image.sh: $SUITE from $DEBIAN_MIRROR into $ROOTFS"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR"

cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# Local CAs (for instance a TLS-intercepting egress proxy) must be trusted inside the image too,
# or pip in the image build cannot reach PyPI. Machines without any add nothing.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
fi

cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
chroot "$ROOTFS" /bin/sh -eu <<'EOF'
export DEBIAN_FRONTEND=noninteractive
update-ca-certificates
apt-get update -q
apt-get upgrade -y -q
apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /var/tmp/*
EOF
# podman supplies resolv.conf at run time; keep this machine's out of the image.
: >"$ROOTFS/etc/resolv.conf"

# `python:3.11-slim` exposes `python`; the Debian package only `python3`. Same name in both bases.
ln -sf python3 "$ROOTFS/usr/bin/python"

tar --numeric-owner -C "$ROOTFS" -cf - . |
    podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_TAG"
rm -rf "$ROOTFS"
podman image ls "$BASE_TAG"
