#!/bin/sh
# Run the built image as SageMaker would (`IMAGE serve`, model at /opt/ml/model), then check
# /ping, a JSON and a CSV invocation, and that SIGTERM stops it well before the 30 s SIGKILL;
# then as a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true, the model at
# /opt/ml/models/demo/model): /ping with no model, load, invoke, list, unload; then a TensorFlow
# SavedModel that the image's TensorFlow makes, served by the image.
#
#   sudo build/container/smoke_test.sh                  # image onebox:cpu, the demo model, port 8080
#
# Env: IMAGE_TAG (default onebox:cpu), MODEL_DIR (default build/demo/model), PORT (default 8080).
set -eu

REPO=$(cd "$(dirname "$0")/../.." && pwd)
IMAGE_TAG=${IMAGE_TAG:-onebox:cpu}
MODEL_DIR=$(cd "${MODEL_DIR:-$REPO/build/demo/model}" && pwd)
PORT=${PORT:-8080}
NAME=onebox-smoke-$$
URL=http://localhost:$PORT

fail() {
    echo "smoke_test.sh: FAIL: $*" >&2
    podman logs "$NAME" 2>&1 | tail -40 >&2 || true
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    exit 1
}

# Wait for /ping 200 from the container named $NAME; $1 names it in a failure.
wait_for_ping() {
    start=$(date +%s)
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/ping")" = 200 ]; do
        [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "$1 exited before /ping answered 200"
        [ $(($(date +%s) - start)) -lt 240 ] || fail "$1: /ping not 200 within 240 s (SageMaker's limit)"
        sleep 0.5
    done
}

# Same podman flags as build_image.sh (runc, ulimits this VM accepts); host network since no CNI
# network is configured here, so SAGEMAKER_BIND_TO_PORT picks the port instead of -p.
podman --runtime runc run -d --name "$NAME" --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    -e SAGEMAKER_BIND_TO_PORT="$PORT" \
    -v "$MODEL_DIR:/opt/ml/model:ro" "$IMAGE_TAG" serve >/dev/null

wait_for_ping "the container"
echo "ping: 200 after $(($(date +%s) - start)) s"

json=$(curl -sf -X POST -H 'Content-Type: application/json' -d '[[5.1,3.5,1.4,0.2],[6.3,3.3,6.0,2.5]]' \
    "$URL/invocations") || fail "JSON invocation was not 2xx"
echo "json: $json"
echo "$json" | python3 -c '
import json, sys
rows = json.load(sys.stdin)
assert len(rows) == 2 and all(len(r) == 3 and abs(sum(r) - 1) < 1e-4 for r in rows), rows
assert rows[0].index(max(rows[0])) == 0 and rows[1].index(max(rows[1])) == 2, rows
' || fail "JSON response is not two probability rows of the demo model"

csv=$(printf '5.1,3.5,1.4,0.2\n' | curl -sf -X POST -H 'Content-Type: text/csv' -H 'Accept: text/csv' \
    --data-binary @- "$URL/invocations") || fail "CSV invocation was not 2xx"
echo "csv: $csv"
[ "$(echo "$csv" | awk -F, 'NR == 1 { print NF }')" = 3 ] || fail "CSV response is not three columns"

pid1=$(podman exec "$NAME" cat /proc/1/cmdline | tr '\0' ' ')
echo "PID 1: $pid1"
case "$pid1" in
    *onebox-entrypoint* | sh\ * | /bin/sh\ *) fail "PID 1 is still the shell entrypoint: $pid1" ;;
esac

stop_start=$(date +%s)
podman stop -t 30 "$NAME" >/dev/null
stopped_in=$(($(date +%s) - stop_start))
status=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
podman rm "$NAME" >/dev/null
echo "stop: SIGTERM -> exited $status in $stopped_in s"
[ "$stopped_in" -lt 30 ] || fail "SIGTERM did not stop the server; it was killed after 30 s"
MME=$NAME-mme
podman --runtime runc run -d --name "$MME" --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    -e SAGEMAKER_BIND_TO_PORT="$PORT" -e SAGEMAKER_MULTI_MODEL=true \
    -v "$MODEL_DIR:/opt/ml/models/demo/model:ro" "$IMAGE_TAG" serve >/dev/null
NAME=$MME  # what fail() shows and removes
wait_for_ping "the multi-model endpoint"
[ "$(curl -s "$URL/models")" = '{"models":[]}' ] || fail "a new multi-model endpoint lists models"
curl -sf -X POST -d '{"model_name": "demo", "url": "/opt/ml/models/demo/model"}' "$URL/models" >/dev/null \
    || fail "loading the demo model was not 2xx"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{"model_name": "demo", "url": "/opt/ml/models/demo/model"}' \
    "$URL/models")" = 409 ] || fail "loading it again was not 409"
mme=$(curl -sf -X POST -H 'Content-Type: application/json' -d '[[5.1,3.5,1.4,0.2]]' \
    "$URL/models/demo/invoke") || fail "invoking the loaded model was not 2xx"
echo "multi-model invoke: $mme"
echo "$mme" | python3 -c 'import json, sys; r = json.load(sys.stdin)[0]; assert r.index(max(r)) == 0, r' \
    || fail "the multi-model answer is not the demo model's"
curl -s "$URL/models" | grep -q '"modelName":"demo"' || fail "the loaded model is not listed"
curl -sf -X DELETE "$URL/models/demo" >/dev/null || fail "unloading was not 2xx"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d '[[1,2,3,4]]' \
    "$URL/models/demo/invoke")" = 404 ] || fail "an unloaded model's invocation was not 404"
podman stop -t 30 "$MME" >/dev/null
podman rm "$MME" >/dev/null
echo "multi-model: load, 409, invoke, list, unload, 404: OK"

# A TensorFlow SavedModel, made by the image's own TensorFlow (y = x @ w + b, TF Serving's
# version folder), served by the image: JSON in, JSON out, and a wrong shape is 400.
TF_DIR=$(mktemp -d)
chmod 777 "$TF_DIR"
podman --runtime runc run --rm --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    -v "$TF_DIR:/out" --entrypoint python "$IMAGE_TAG" -c '
import tensorflow as tf
class Linear(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        self.b = tf.Variable([0.5, -0.5])
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.matmul(x, self.w) + self.b}
m = Linear()
tf.saved_model.save(m, "/out/model/1", signatures={"serving_default": m.serve})
' >/dev/null 2>&1 || { rm -rf "$TF_DIR"; fail "the image could not save a SavedModel"; }
TFN=$NAME-tf
podman --runtime runc run -d --name "$TFN" --network host \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    -e SAGEMAKER_BIND_TO_PORT="$PORT" -v "$TF_DIR/model:/opt/ml/model:ro" "$IMAGE_TAG" serve >/dev/null
NAME=$TFN
wait_for_ping "the SavedModel server"
tf=$(curl -sf -X POST -H 'Content-Type: application/json' -d '[[1,2,3],[0,0,0]]' "$URL/invocations") \
    || fail "the SavedModel invocation was not 2xx"
echo "savedmodel: $tf"
echo "$tf" | python3 -c 'import json, sys; assert json.load(sys.stdin) == [[4.5, 4.5], [0.5, -0.5]]' \
    || fail "the SavedModel answer is not x @ w + b"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d '[[1,2]]' \
    "$URL/invocations")" = 400 ] || fail "a wrong shape for the SavedModel was not 400"
podman stop -t 30 "$TFN" >/dev/null
podman rm "$TFN" >/dev/null
rm -rf "$TF_DIR"
echo "savedmodel: served by the image's TensorFlow, 400 for a wrong shape: OK"
echo "smoke_test.sh: OK"
