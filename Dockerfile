# onebox CPU image: serves a model under the SageMaker hosting contract (container/README.md).
#   docker build -t onebox:cpu .
#   docker run -p 8080:8080 -v "$PWD/model:/opt/ml/model:ro" onebox:cpu serve
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# pip reads PIP_* from the environment and build args are environment variables for RUN, so these
# need no flags below. The default index supplies the CPU build of torch (pinned `+cpu` in
# cpu.txt); a build without it passes PIP_EXTRA_INDEX_URL= and PIP_FIND_LINKS=/wheels with the
# wheels in build/container/wheels/, which is mounted rather than copied so they add no layer.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# A venv rather than the system interpreter: Debian-based images refuse system-wide pip installs
# (PEP 668), and one location works for every base.
RUN python3 -m venv /opt/venv

# Dependencies first, in their own layer, so that editing the source does not reinstall torch.
COPY build/requirements/cpu.txt /opt/onebox/requirements.txt
RUN --mount=type=bind,source=build/container/wheels,target=/wheels \
    pip install --no-cache-dir -r /opt/onebox/requirements.txt

COPY pyproject.toml README.md /opt/onebox/src/
COPY serving /opt/onebox/src/serving
COPY handlers /opt/onebox/src/handlers
RUN pip install --no-cache-dir --constraint /opt/onebox/requirements.txt "/opt/onebox/src[onnx,torch,tensorflow]" \
    && pip check \
    && rm -rf /opt/onebox/src

COPY container/entrypoint /usr/local/bin/onebox-entrypoint

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      com.amazonaws.sagemaker.capabilities.multi-models=true

EXPOSE 8080

# Exec form: the entrypoint execs the server, which is then PID 1 and gets SIGTERM from SageMaker.
ENTRYPOINT ["/usr/local/bin/onebox-entrypoint"]
CMD ["serve"]
