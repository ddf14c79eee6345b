#!/bin/sh
# Build the CPU image with podman on a machine with no Docker engine and no registry access
# (run build/container/make_base_image.sh first). With Docker and internet, plain
# `docker build -t onebox:cpu .` is enough.
#
#   sudo build/container/build_image.sh                 # -> onebox:cpu
#
# Env: IMAGE_TAG (default onebox:cpu), BASE_IMAGE (default localhost/onebox-base:bookworm),
#      WHEEL_DIR (default /opt/wheels): wheels there matching build/requirements/cpu.txt's torch
#      pin are copied into build/container/wheels/ (git-ignored) and used instead of the PyTorch
#      index, which this machine cannot reach.
set -eu

REPO=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE_TAG=${IMAGE_TAG:-onebox:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/onebox-base:bookworm}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}

TORCH_PIN=$(sed -n 's/^torch==//p' "$REPO/build/requirements/cpu.txt")
set -- --build-arg "BASE_IMAGE=$BASE_IMAGE"
if ls "$WHEEL_DIR"/torch-"$TORCH_PIN"-*.whl >/dev/null 2>&1; then
    cp -u "$WHEEL_DIR"/torch-"$TORCH_PIN"-*.whl "$REPO/build/container/wheels/"
    set -- "$@" --build-arg PIP_EXTRA_INDEX_URL= --build-arg PIP_FIND_LINKS=/wheels
fi

# runc, not the default crun; the explicit ulimits because this VM refuses podman's default
# (raising RLIMIT_NOFILE) for the build's RUN containers; host network because the build's RUN
# steps need PyPI and there is no CNI network set up.
start=$(date +%s)
podman --runtime runc build --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    "$@" -t "$IMAGE_TAG" "$REPO"
echo "build_image.sh: built $IMAGE_TAG in $(($(date +%s) - start)) s"
podman image ls "$IMAGE_TAG"
